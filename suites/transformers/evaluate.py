#!/usr/bin/env python
"""Score an exported model (the traced part, QDQ int8 or fp32 ONNX) with the real tokenizer in front.

    python suites/transformers/evaluate.py checkpoint/minilm_int8.onnx            # embedded Austen test set
    python suites/transformers/evaluate.py model.onnx --tokenizer DIR --data DIR  # test.jsonl / test.tsv

Text -> tokenizer (padding to the file's static length, truncation at --max-length) -> 0/1 mask ->
additive attention bias -> onnxruntime -> argmax. Prints accuracy and macro-F1 (JSON with --json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def static_shape(sess) -> tuple[int, int]:
    shape = sess.get_inputs()[0].shape
    if not all(isinstance(d, int) for d in shape):
        raise ValueError(f"expected a static (batch, length) input, the file has {shape}")
    return shape[0], shape[1]


def score_onnx(onnx_path: str, tokenizer, examples: list, num_labels: int, max_length: int,
               threads: int | None = None) -> dict:
    """Accuracy / macro-F1 (%) of ``onnx_path`` on (text, label, ...) examples, tokenized here."""
    from suites.transformers.train import onnx_predict, scores
    from ts_qat_pytorch.onnx.verify import ort_session
    sess = ort_session(onnx_path, threads=threads)
    batch, length = static_shape(sess)
    enc = tokenizer([e[0] for e in examples], padding="longest", truncation=True, max_length=min(max_length, length),
                    return_tensors="np", return_token_type_ids=False)
    logits = onnx_predict(sess, enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64), batch, length)
    return scores(logits.argmax(1), np.array([e[1] for e in examples]), num_labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded MiniLM's)")
    p.add_argument("--data", default=None, help="folder with test.jsonl / test.tsv (default: the Austen test set)")
    from suites.transformers.main import EMBEDDED
    p.add_argument("--max-length", type=int, default=EMBEDDED["max_length"])
    p.add_argument("--passage-lines", type=int, default=EMBEDDED["passage_lines"])
    p.add_argument("--test-per-class", type=int, default=EMBEDDED["test_per_class"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer
    from suites.transformers.main import load_data
    ns = argparse.Namespace(embedded=a.data is None, data=a.data, passage_lines=a.passage_lines, train_per_class=1,
                            test_per_class=a.test_per_class if a.data is None else None, seed=0)
    _, test, names = load_data(ns)
    tok_dir = a.tokenizer
    if tok_dir is None:
        from suites.common.assets import MINILM_L6
        tok_dir = MINILM_L6.fetch()
    s = score_onnx(a.onnx, AutoTokenizer.from_pretrained(tok_dir), test, len(names), a.max_length, a.threads)
    s["examples"] = len(test)
    print(json.dumps(s) if a.json else f"{a.onnx}: accuracy {s['accuracy']:.2f} macro-F1 {s['macro_f1']:.2f} "
          f"on {len(test)} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
