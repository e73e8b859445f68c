#!/usr/bin/env python
"""Quantization-aware training of Hugging Face encoder classifiers (BERT, DistilBERT, RoBERTa, MiniLM).

    python suites/transformers/main.py                    # embedded default (README.md): MiniLM-L6 on Austen
    python suites/transformers/main.py --model DIR_OR_HUB_NAME --data DIR --max-length 128 --float-epochs 2
    torchrun --nproc_per_node 2 suites/transformers/main.py --dist-backend gloo ...

Float fine-tune (cached) -> float eval -> calibration -> QAT (kd from the float model) -> QDQ ONNX export of the
traced part -> int8 evaluation in onnxruntime through the real tokenizer -> ORT latency int8 vs fp32; the float model
saved with save_pretrained. Tokenization and the attention mask run outside the traced part (model.py says why).
The suite (model, data, metric, recipe) is suite.py; the pipeline is suites/common/runner.py.
"""
from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # running the file directly from a checkout
    sys.path.insert(0, _REPO)

from suites.common import runner  # noqa: E402
from suites.transformers.suite import SUITE  # noqa: E402


def main(argv=None) -> int:
    return runner.main(SUITE, argv)


if __name__ == "__main__":
    sys.exit(main())
