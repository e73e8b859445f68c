#!/usr/bin/env python
"""Semantic segmentation quantization-aware training with ts_qat_pytorch.

    python suites/segmentation/main.py                            # embedded default (no downloads beyond
                                                                  # the cached real assets), see README.md
    python suites/segmentation/main.py --data /voc -nc 21 --model-path lraspp_voc.pth --image-size 512
    torchrun --nproc_per_node 2 suites/segmentation/main.py --dist-backend gloo ...

Without --data the embedded default runs: LR-ASPP on torchvision's mobilenet_v2 with real ImageNet weights, on
SYNTHETIC scenes of real Fashion-MNIST items with per-pixel masks (11 classes, 64 x 64): float fine-tune (cached)
-> float eval -> calibration -> QAT -> ONNX export -> int8 evaluation in onnxruntime (mIoU, pixel accuracy,
per-class IoU). The suite (model, data, metric, recipe) is suite.py; the pipeline is suites/common/runner.py.
"""
from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # running the file directly from a checkout
    sys.path.insert(0, _REPO)

from suites.common import runner  # noqa: E402
from suites.segmentation.suite import SUITE  # noqa: E402


def main(argv=None) -> int:
    return runner.main(SUITE, argv)


if __name__ == "__main__":
    sys.exit(main())
