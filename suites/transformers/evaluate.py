#!/usr/bin/env python
"""Score an exported model (the traced part, QDQ int8 or fp32 ONNX) with the real tokenizer in front, and the
suite's scoring helpers (accuracy / macro-F1, onnxruntime prediction, fp32-vs-int8 latency).

    python suites/transformers/evaluate.py checkpoint/transformers/minilm_onnx_quantization.onnx   # Austen test set
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from suites.transformers.model import attention_bias  # noqa: E402


def scores(pred: np.ndarray, y: np.ndarray, num_labels: int) -> dict:
    """Accuracy (%) and macro-F1 (%)."""
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (y == c)).sum())
        fp, fn = int(((pred == c) & (y != c)).sum()), int(((pred != c) & (y == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": round(100.0 * float((pred == y).mean()), 3), "macro_f1": round(100.0 * float(np.mean(f1s)), 3)}


def static_shape(sess) -> tuple[int, int]:
    shape = sess.get_inputs()[0].shape
    if not all(isinstance(d, int) for d in shape):
        raise ValueError(f"expected a static (batch, length) input, the file has {shape}")
    return shape[0], shape[1]


def onnx_predict(sess, ids: np.ndarray, mask: np.ndarray, batch: int, length: int) -> np.ndarray:
    """Logits from an exported split model with a static (batch, length) input: pads rows and columns."""
    names = [i.name for i in sess.get_inputs()]
    out = []
    for s in range(0, len(ids), batch):
        i, m = ids[s:s + batch], mask[s:s + batch]
        k = len(i)
        pi, pm = np.zeros((batch, length), np.int64), np.zeros((batch, length), np.int64)
        pm[:, 0] = 1  # padding rows attend to one token, so their softmax is defined
        pi[:k, :i.shape[1]], pm[:k, :m.shape[1]] = i, m
        bias = attention_bias(torch.from_numpy(pm)).numpy()
        out.append(sess.run(None, {names[0]: pi, names[1]: bias})[0][:k])
    return np.concatenate(out)


def score_onnx(sess, tokenizer, examples: list, num_labels: int, max_length: int) -> dict:
    """Accuracy / macro-F1 (%) of an onnxruntime session of the split on (text, label, ...) examples, tokenized
    here."""
    batch, length = static_shape(sess)
    enc = tokenizer([e[0] for e in examples], padding="longest", truncation=True, max_length=min(max_length, length),
                    return_tensors="np", return_token_type_ids=False)
    logits = onnx_predict(sess, enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64), batch,
                          length)
    return scores(logits.argmax(1), np.array([e[1] for e in examples]), num_labels)


def ort_latency(paths: dict[str, str], batch: int, length: int, threads: int | None, repeats: int = 10) -> dict:
    """Median wall time (ms) of one (batch, length) forward of each model in onnxruntime, after warm-up. The models
    take turns run by run, so a noisy neighbour on the machine slows both alike and the ratio stays honest."""
    from ts_qat_pytorch.onnx.verify import interleaved_times, ort_session
    g = np.random.default_rng(0)
    ids = g.integers(1000, 2000, (batch, length)).astype(np.int64)
    sessions, feeds = {}, {}
    for k, path in paths.items():
        sessions[k] = ort_session(path, threads=threads)
        names = [i.name for i in sessions[k].get_inputs()]
        feeds[k] = {names[0]: ids, names[1]: np.zeros((batch, 1, 1, length), np.float32)}
    ts = interleaved_times(sessions, feeds, repeats, warmup=2)
    return {k: round(1000 * float(np.median(v)), 2) for k, v in ts.items()}


def main(argv=None) -> int:
    from suites.transformers.recipe import EMBEDDED
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded MiniLM's)")
    p.add_argument("--data", default=None, help="folder with test.jsonl / test.tsv (default: the Austen test set)")
    p.add_argument("--max-length", type=int, default=EMBEDDED["max_length"])
    p.add_argument("--passage-lines", type=int, default=EMBEDDED["passage_lines"])
    p.add_argument("--test-per-class", type=int, default=EMBEDDED["test_per_class"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from suites.transformers.data import load_examples
    from ts_qat_pytorch.onnx.verify import ort_session
    ns = argparse.Namespace(embedded=a.data is None, data=a.data, passage_lines=a.passage_lines, train_per_class=1,
                            test_per_class=a.test_per_class if a.data is None else None, seed=0)
    _, test, names = load_examples(ns)
    tok_dir = a.tokenizer
    if tok_dir is None:
        from suites.common.assets import MINILM_L6
        tok_dir = MINILM_L6.fetch()
    s = score_onnx(ort_session(a.onnx, threads=a.threads), AutoTokenizer.from_pretrained(tok_dir), test, len(names),
                   a.max_length)
    s["examples"] = len(test)
    print(json.dumps(s) if a.json else f"{a.onnx}: accuracy {s['accuracy']:.2f} macro-F1 {s['macro_f1']:.2f} "
          f"on {len(test)} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
