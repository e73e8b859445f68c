#!/usr/bin/env python3
"""YOLOv5 float training and quantization-aware training (the manual's command):

    python train_qat.py --data data/coco.yaml --device 0 --epochs 10 --batch-size 49 --workers 6 --quantize \
        --output_dir checkpoint_qat --hyp data/hyp.qat.yaml --weights yolov5s.pt

Without --quantize: float training (from --weights or from scratch). With it: the network part (backbone + neck
+ Detect convolutions) is prepared for QAT, calibrated, fine-tuned, exported to QDQ ONNX (+ parameter JSON) and
the ONNX model is evaluated in onnxruntime with the same float post-processing (decode + NMS).

Without --data: the embedded default, SYNTHETIC scenes of real Fashion-MNIST items (suites/yolov5/synth.py):
yolov5n (v6 layout) trained from scratch in float (cached), evaluated with pycocotools, then with --quantize:
calibration, QAT, export, onnxruntime int8 evaluation; metrics in <output_dir>/yolov5_metrics.json.
Distributed: torchrun --nproc_per_node N train_qat.py ... (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from suites.common.metrics import RunMetrics  # noqa: E402
from suites.common.suite import Metric  # noqa: E402
from suites.yolov5 import ckpt as C  # noqa: E402
from suites.yolov5 import datasets as D  # noqa: E402
from suites.yolov5 import pipeline as P  # noqa: E402
from suites.yolov5.evaluate import torch_predictor  # noqa: E402
from suites.yolov5.models.yolo import ConfigError, Model  # noqa: E402
from suites.yolov5.trainer import ModelEMA, train_steps  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
say = P.say
METRIC = Metric("map50_95", "higher", ".4f")  # COCO mAP@.5:.95 (pycocotools)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="data YAML (data/coco.yaml layout); default: embedded scenes")
    ap.add_argument("--cfg", default=None, help="model YAML or name (yolov5s, yolov5n-v6, ...)")
    ap.add_argument("--weights", default=None, help="start from: this suite's .pt or an ultralytics YOLOv5 .pt")
    ap.add_argument("--hyp", default=None, help="hyper-parameter YAML (default data/hyp.qat.yaml with --quantize, "
                    "data/hyp.scratch.yaml without)")
    ap.add_argument("--quantize", action="store_true", help="quantization-aware training (calibration first)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default 10; embedded: --steps instead)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps instead of epochs (QAT or float)")
    ap.add_argument("--float-steps", type=int, default=1000, help="embedded default: float training steps")
    ap.add_argument("--batch-size", type=int, default=32, help="total batch size (split over ranks)")
    ap.add_argument("--img-size", type=int, default=None, help="square input size (default 640; embedded 128)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or a CUDA index (0, 1, ...)")
    ap.add_argument("--backend", default="TSQAT", choices=["TSQAT", "ONNXRuntime"])
    ap.add_argument("--output_dir", "--output-dir", dest="output_dir", default="checkpoint")
    ap.add_argument("--metrics", default=None, help="metrics JSON (default <output_dir>/yolov5_metrics.json)")
    ap.add_argument("--baselines", default=None, help="compare the metrics with this baselines.json")
    ap.add_argument("--conf-thres", type=float, default=0.001)
    ap.add_argument("--iou-thres", type=float, default=0.6)
    ap.add_argument("--on-bad-label", choices=["stop", "skip"], default="stop")
    ap.add_argument("--train-images", type=int, default=None, help="use a subset of the training images")
    ap.add_argument("--val-images", type=int, default=None, help="use a subset of the validation images")
    ap.add_argument("--val-batch-size", type=int, default=50)
    ap.add_argument("--scenes", type=int, nargs=2, default=(6000, 500), metavar=("TRAIN", "VAL"),
                    help="embedded default: number of synthetic train / val scenes")
    ap.add_argument("--cache-dir", default=None, help="embedded caches (default $TS_QAT_CACHE)")
    ap.add_argument("--no-float-cache", action="store_true")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--resume", default=None, help="a QAT checkpoint of this script (with --export-only)")
    ap.add_argument("--export-only", action="store_true", help="export --resume (or calibrate --weights: PTQ) "
                    "and evaluate it in onnxruntime, no training")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def setup_distributed(args) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            args.device = str(int(os.environ.get("LOCAL_RANK", 0)))


def resolve(args) -> None:
    args.embedded = args.data is None
    args.device = torch.device("cpu" if args.device == "cpu" or not torch.cuda.is_available()
                               else f"cuda:{args.device}")
    args.img_size = args.img_size or (128 if args.embedded else 640)
    if args.img_size % 32:
        raise ConfigError(f"--img-size {args.img_size} must be a multiple of 32 (the largest stride)")
    src = args.cfg or (args.weights if args.weights else None)
    args.cfg = args.cfg or ("yolov5n-v6" if args.embedded else "yolov5s")
    # output file prefix: the config's name, or the --weights file's when the model comes from it
    args.name = os.path.splitext(os.path.basename(str(src or args.cfg)))[0]
    args.hyp = args.hyp or os.path.join(HERE, "data", "hyp.qat.yaml" if args.quantize else "hyp.scratch.yaml")
    args.metrics = args.metrics or os.path.join(args.output_dir, "yolov5_metrics.json")
    if args.embedded and args.epochs is None and args.steps is None:
        args.steps = 240 if args.quantize else None
    if args.epochs is None:
        args.epochs = 10


def load_data(args):
    if args.embedded:
        from suites.yolov5.synth import fashion_scenes
        cfg = fashion_scenes(n_train=args.scenes[0], n_val=args.scenes[1], seed=args.seed,
                             cache_dir=args.cache_dir)
    else:
        cfg = D.load_data_config(args.data)
    val, cat_ids, vskips = D.load_split(cfg, "val", args.on_bad_label)
    need_train = not args.export_only or args.quantize
    train, _c, tskips = D.load_split(cfg, "train", args.on_bad_label) if need_train else ([], None, D.Skips())
    return cfg, P.subset(train, args.train_images, args.seed), P.subset(val, args.val_images, args.seed), cat_ids, \
        {"train": tskips.counts, "val": vskips.counts}


def float_model(args, cfg, train, hyp, stages):
    """The float model: --weights, the embedded cache, or trained here from scratch (embedded)."""
    nc = cfg["nc"]
    if args.weights:
        m = C.build_from_weights(args.weights, nc)
        say(f"=> loaded float weights {args.weights} ({m.yaml.get('_path', 'embedded config')})")
        return m
    m = Model(args.cfg, nc=nc)
    if not args.embedded:
        return m
    from suites.common.assets import cache_dir
    key = dict(cfg=os.path.basename(str(args.cfg)), img=args.img_size, steps=args.float_steps, bs=args.batch_size,
               seed=args.seed, scenes=list(args.scenes), hyp=hyp, data=os.path.basename(cfg["path"]), recipe=1)
    path = P.float_cache_path(args.cache_dir or cache_dir(), key)
    if os.path.exists(path) and not args.no_float_cache:
        try:
            fc, sd = C.load_weights(path, "float cache")
            m.load_compatible_state_dict(sd, path)
            say(f"=> reusing the cached float model {path}")
            stages.run["float_cached"] = True
            stages["times_s"]["float_train"] = 0.0
            return m
        except Exception as exc:  # noqa: BLE001 - any problem: train again
            logging.getLogger("suites").warning("float cache %s unusable (%s); training again", path, exc)
    stages.run["float_cached"] = False
    torch.manual_seed(args.seed)
    with stages.timed("float_train"):
        dl, sampler = P.train_loader(train, args.img_size, args.batch_size, args.workers, args.seed)
        ema = ModelEMA(m, tau=float(hyp.get("ema_tau", 100)))
        mm = nn.parallel.DistributedDataParallel(m) if dist.is_initialized() else m
        r = train_steps(mm, dl, args.float_steps, hyp, float(hyp.get("lr0", 0.003)), m.detect.anchors, nc,
                        args.img_size, say, prefix="Float", ema=ema, sampler=sampler, device=args.device)
        m = ema.ema
        stages.run.update(float_train_loss=r["loss"], float_steps=args.float_steps, float_step_s=r["step_s"])
        if P.is_main():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            C.save_float(path, m, key=key)
            say(f"=> float model cached at {path}")
    return m


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        setup_distributed(args)
        resolve(args)
        return run(args)
    except (ConfigError, D.DataError, C.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> int:
    hyp = P.load_hyp(args.hyp)
    if args.quantize and not args.embedded and not (args.weights or args.resume):
        raise ConfigError("--quantize fine-tunes trained weights: give --weights (or --resume with --export-only)")
    if args.weights:
        C.load_weights(args.weights)  # readable before any long work
    if args.resume:
        C.check_resume(args.resume)  # readable, a QAT checkpoint: before data, model and calibration
    stages = RunMetrics(args.metrics, "yolov5", args.name, args.backend if args.quantize else None, METRIC, log=P.say,
                        digits=4, entry="suites/yolov5/train_qat.py", argv=args.argv)
    stages.run.update(embedded=args.embedded, world_size=dist.get_world_size() if dist.is_initialized() else 1,
                      dataset="synthetic Fashion-MNIST scenes" if args.embedded else args.data)
    stages.extras.update(img_size=args.img_size)
    with stages.timed("data"):
        cfg, train, val, cat_ids, skipped = load_data(args)
    stages.run.update(train_images=len(train), val_images=len(val), skipped=skipped)
    stages.extras.update(nc=cfg["nc"])
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    float_hyp = hyp if not args.quantize else P.load_hyp(os.path.join(HERE, "data", "hyp.scratch.yaml"))
    model = float_model(args, cfg, train, float_hyp, stages)
    model.to(args.device)
    ev = P.Evaluator(val, cat_ids, cfg["names"], args.img_size, args.val_batch_size, args.workers,
                     model.detect.anchors, model.detect.stride, args.conf_thres, args.iou_thres)
    meta = P.model_meta(model, args.img_size, cfg["names"])
    stages.extras.update(conv_layers=P.count_convs(model))
    if P.is_main() and (args.embedded or args.weights):
        with stages.timed("float_eval"):
            r = ev.run(torch_predictor(model, args.device), "Float")
        stages.score("float", r)
    if not args.quantize:
        if not args.embedded and not args.export_only:
            from suites.yolov5.train_float import train_float_epochs
            train_float_epochs(model, train, ev, hyp, args, stages)
        return stages.finish(args.baselines)
    from suites.yolov5.qat import run_qat
    run_qat(model, train, ev, hyp, meta, args, stages)
    return stages.finish(args.baselines)


if __name__ == "__main__":
    sys.exit(main())
