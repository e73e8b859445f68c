#!/usr/bin/env python3
"""YOLOv5 float training and quantization-aware training (the manual's command):

    python train_qat.py --data data/coco.yaml --device 1,2,3,4,5,6,7 --epochs 10 --batch-size 49 --workers 6 \
        --quantize --output_dir checkpoint_qat --hyp data/hyp.qat.yaml            # --weights yolov5s.pt (default)

With --quantize: the network (backbone + neck + Detect convolutions) is prepared for QAT, calibrated, fine-tuned
(distilled with --distill-method kd), exported to QDQ ONNX each epoch and evaluated in onnxruntime with the same
float post-processing (decode + NMS) and pycocotools. Without it: float training (--data) or evaluation.
Outputs in <output_dir>/yolov5/ (or ultralytics' --project/--name); metrics in <arch>_metrics.json.

Without --data: the embedded default, SYNTHETIC scenes of real Fashion-MNIST items (suites/yolov5/synth.py):
yolov5n (v6 layout) trained from scratch in float (cached), evaluated, then with --quantize calibration, QAT,
export and the onnxruntime int8 evaluation. The suite is suite.py; the pipeline is suites/common/runner.py
(--device 0,1: one process per GPU; torchrun works too).
"""
from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # running the file directly from a checkout
    sys.path.insert(0, _REPO)

from suites.common import runner  # noqa: E402
from suites.yolov5.suite import SUITE  # noqa: E402


def main(argv=None) -> int:
    return runner.main(SUITE, argv)


if __name__ == "__main__":
    sys.exit(main())
