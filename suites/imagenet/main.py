#!/usr/bin/env python
"""ImageNet quantization-aware training with ts_qat_pytorch (descended from pytorch/examples imagenet).

    python suites/imagenet/main.py                                # embedded default (no downloads beyond
                                                                  # the cached real assets), see README.md
    python suites/imagenet/main.py --data /imagenet -a resnet18 --pretrained -b 256 --lr 1e-4 --epochs 1
    torchrun --nproc_per_node 2 suites/imagenet/main.py --dist-backend gloo ...

Without --data the embedded default runs: torchvision mobilenet_v2 with real ImageNet weights and a new
10-class head on Fashion-MNIST (grey -> 3 channels, 64x64, ImageNet normalisation):
float fine-tune (cached) -> float eval -> calibration -> QAT with kd from the float model -> ONNX export
-> int8 evaluation in onnxruntime. Every stage's result and wall time lands in one metrics JSON.
The suite (model, data, metric, recipe) is suite.py; the pipeline is suites/common/runner.py.
"""
from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # running the file directly from a checkout
    sys.path.insert(0, _REPO)

from suites.common import runner  # noqa: E402
from suites.imagenet.suite import SUITE  # noqa: E402


def main(argv=None) -> int:
    return runner.main(SUITE, argv)


if __name__ == "__main__":
    sys.exit(main())
