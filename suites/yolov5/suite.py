"""The YOLOv5 suite: its model (models/: the traceable network returning the raw Detect maps), its data (a data
YAML with YOLO labels or COCO JSON, or the embedded synthetic scenes; datasets.py, synth.py), its loss (loss.py),
its metric (COCO mAP@.5:.95 from pycocotools after the shared float decode + NMS, in PyTorch and onnxruntime;
evaluate.py, postprocess.py) and its recipe (data/hyp.*.yaml). The pipeline is the runner's
(suites/common/runner.py); train_qat.py is the script.

The manual's flags keep their meaning: ``--quantize`` (without it: float training / evaluation), ``--export-only``
(= the runner's -e), ``--weights`` (this suite's checkpoint or an ultralytics .pt), ``--hyp``, ``--cfg``,
``--img-size``, ``--output_dir``; ultralytics' ``--img/--imgsz``, ``--conf-thres``, ``--iou-thres``, ``--save-json``,
``--project/--name/--exist-ok``.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

from suites.common.distributed import is_main, say
from suites.common.suite import Data, Metric, Suite, SuiteError
from suites.yolov5 import ckpt as C
from suites.yolov5 import datasets as D
from suites.yolov5 import evaluate as E
from suites.yolov5.loss import YoloLoss
from suites.yolov5.models.yolo import ConfigError, Model, load_config
from suites.yolov5.postprocess import meta_path, write_meta

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WEIGHTS = "yolov5s.pt"  # ultralytics' default: --data with --quantize fine-tunes it from the working directory

# lr, optimizer, weight decay and calibration batches come from the hyp YAML (data/hyp.qat.yaml with --quantize,
# data/hyp.scratch.yaml without, and for the embedded float training): see Yolov5Suite.recipe
EMBEDDED = dict(
    cfg="yolov5n-v6", img_size=128, scenes=(6000, 500),
    float_steps=1000,  # float training from scratch (cached): 1000 steps of batch 32, EMA
    # QAT: 2 epochs x 3840 scenes at batch 32 = 240 steps, BN statistics frozen, gradients clipped at 10
    epochs=2, train_images=3840, batch_size=32, clip_grad_norm=10.0,
    val_batch_size=50, print_freq=20, workers=0, backend="TSQAT", distill_alpha=1.0,
)
GENERAL = dict(
    cfg="yolov5s", img_size=640, scenes=(6000, 500), float_steps=1000,
    epochs=10, train_images=None, batch_size=32, clip_grad_norm=10.0,
    val_batch_size=50, print_freq=20, workers=0, backend="TSQAT", distill_alpha=1.0,
)
SMOKE = dict(scenes=(48, 16), float_steps=2, img_size=64, epochs=1, train_images=8, batch_size=4, calib_batches=1,
             val_batch_size=16, print_freq=1)
STAGE = {"Float": "float", "QAT": "qat", "ORT int8": "ort"}  # evaluations that write a PR curve / predictions


class Yolov5Suite(Suite):
    name = "yolov5"
    script = "train_qat.py"
    metric = Metric("map50_95", "higher", ".4f")
    digits = 4
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
    errors = (ConfigError, D.DataError, C.CheckpointError)
    train_meters = (("box", ":.4f"), ("obj", ":.4f"), ("cls", ":.4f"))
    channels_last = False
    collate = staticmethod(D.collate)
    cache_tag = "scenes"

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Per-run state (the module's SUITE serves every run of a process)."""
        self.data_cfg = self.nc = self.names = self.evaluator = None
        self.model_cfg = self.meta = self.criterion = self.conv_layers = None
        self.skipped, self.outputs, self.float_record = {}, {}, {}
        self.loss_items = (0.0, 0.0, 0.0)

    # ---- command line and recipe
    def add_arguments(self, p) -> None:
        p.add_argument("--cfg", default=None, help="model YAML or name in suites/yolov5/models (yolov5s, yolov5n-v6, "
                       "...) (yolov5s; embedded yolov5n-v6)")
        p.add_argument("--weights", default=None, help="start from this suite's checkpoint or an ultralytics YOLOv5 "
                       f".pt (with --data and --quantize: {DEFAULT_WEIGHTS} in the working directory)")
        p.add_argument("--hyp", default=None, help="hyper-parameter YAML (data/hyp.qat.yaml with --quantize, "
                       "data/hyp.scratch.yaml without): lr0, optimizer, momentum, weight_decay, warmup_steps, lrf, "
                       "loss gains, calib_batches, out_range, freeze_bn_step, distill")
        p.add_argument("--quantize", action="store_true",
                       help="quantization-aware training (calibration first); without it: float training / eval")
        p.add_argument("--export-only", action="store_true", help="no training: evaluate, export and evaluate in "
                       "onnxruntime --resume (or the calibrated --weights: PTQ); = -e")
        p.add_argument("--img", "--img-size", "--imgsz", dest="img_size", type=int, default=None,
                       help="square input size, a multiple of 32 (640; embedded 128)")
        p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold of the evaluation")
        p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold of the evaluation")
        p.add_argument("--save-json", action="store_true", help="write each evaluation's detections as a COCO "
                       "results JSON beside the metrics (<arch>_<float|qat|ort>_predictions.json)")
        p.add_argument("--project", default=None, help="outputs in PROJECT/NAME (default runs/train when only "
                       "--name is given); neither: <output-dir>/yolov5/")
        p.add_argument("--name", default=None, help="outputs in PROJECT/NAME (default exp), NAME incremented (exp2, "
                       "exp3, ...) when it exists")
        p.add_argument("--exist-ok", action="store_true", help="reuse PROJECT/NAME, do not increment")
        p.add_argument("--output_dir", dest="output_dir", default=argparse.SUPPRESS,
                       help="the manual's spelling of --output-dir")
        p.add_argument("--on-bad-label", choices=["stop", "skip"], default="stop",
                       help="a bad label or image: stop with an error naming it, or skip the image (counted)")
        p.add_argument("--scenes", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                       help="embedded default: synthetic train / val scenes (6000 500)")
        p.add_argument("--float-steps", type=int, default=None,
                       help="embedded default: float training steps from scratch (1000; 0: none)")

    def recipe(self, args) -> dict:
        """The flags' defaults: the embedded or general recipe, then the hyp YAML's (lr0 -> --lr, optimizer, weight
        decay, calib_batches, freeze_bn_step -> --freeze-bn-epoch, distill -> --distill-method kd). Also resolves
        what the manual's flags mean for the runner: --quantize (else --not-qat), --export-only (-e)."""
        if args.quantize and args.not_qat:
            raise SuiteError("--quantize and --not-qat contradict each other: give --quantize for QAT, neither for "
                             "float training / evaluation")
        args.not_qat = not args.quantize
        args.evaluate = args.evaluate or args.export_only
        args.cfg_given = args.cfg is not None
        rec = dict(self.recipes["embedded" if args.embedded else "general"])
        scratch = os.path.join(HERE, "data", "hyp.scratch.yaml")
        path = args.hyp or (os.path.join(HERE, "data", "hyp.qat.yaml") if args.quantize else scratch)
        args.hyp_values = hyp = load_hyp(path, "--hyp")
        args.float_hyp_values = load_hyp(scratch, "--hyp") if args.quantize else hyp
        rec.update(hyp=path, lr=float(hyp.get("lr0", 5e-4 if args.quantize else 0.01)),
                   optim=str(hyp.get("optimizer", "sgd")).lower(),
                   weight_decay=float(hyp.get("weight_decay", 0.0 if args.quantize else 5e-4)),
                   float_lr=float(args.float_hyp_values.get("lr0", 0.003)))
        if "calib_batches" in hyp:
            rec["calib_batches"] = int(hyp["calib_batches"])
        if "freeze_bn_step" in hyp:
            step = hyp["freeze_bn_step"]
            if step is not None and int(step) > 0:
                raise SuiteError(f"--hyp {path}: freeze_bn_step {step}: the runner freezes BN statistics per epoch; "
                                 "set it to 0 (from the start) or null (never) and give --freeze-bn-epoch N")
            rec["freeze_bn_epoch"] = -1 if step is None else 0
        if float(hyp.get("distill", 0) or 0) > 0:
            rec.update(distill_method="kd", distill_alpha=float(hyp["distill"]))
        if args.pretrained or (not args.embedded and args.quantize and not args.resume and not args.model_path):
            rec["weights"] = DEFAULT_WEIGHTS
        return rec

    def smoke(self, args) -> dict:
        return dict(SMOKE)

    def check_args(self, args) -> None:
        if args.img_size < 32 or args.img_size % 32:
            raise SuiteError(f"--img-size {args.img_size} must be a multiple of 32 (the largest stride)")
        if min(args.scenes) < 1 or args.float_steps < 0:
            raise SuiteError("--scenes must both be >= 1 and --float-steps >= 0")
        for flag, v in (("--conf-thres", args.conf_thres), ("--iou-thres", args.iou_thres)):
            if not 0.0 <= v <= 1.0:
                raise SuiteError(f"{flag} {v} must be within 0..1")
        if args.optim not in ("sgd", "adam", "adamw"):
            raise SuiteError(f"optimizer '{args.optim}' (--hyp {args.hyp} or --optim) must be sgd, adam or adamw")
        args.pretrained = bool(args.weights)  # --weights is this suite's "pretrained" model

    def arch(self, args) -> str:
        """The config's name, or the --weights file's when the model comes from it (yolov5s.pt -> yolov5s)."""
        src = args.weights if args.weights and not args.cfg_given else args.cfg
        return os.path.splitext(os.path.basename(str(src)))[0]

    def output_dir(self, args) -> str:
        """ultralytics' PROJECT/NAME (NAME, NAME2, NAME3 ... unless --exist-ok) when either is given."""
        if args.project is None and args.name is None:
            return super().output_dir(args)
        path = os.path.join(args.project or os.path.join("runs", "train"), args.name or "exp")
        if args.exist_ok or not os.path.exists(path):
            return path
        n = 2
        while os.path.exists(f"{path}{n}"):
            n += 1
        return f"{path}{n}"

    # ---- cheap checks and data
    def check(self, args) -> None:
        self.reset()
        if args.resume and not args.quantize:
            raise SuiteError("--resume restores a QAT checkpoint (train_qat.py --quantize writes them): add "
                             "--quantize; float weights go to --weights")
        if args.weights and args.model_path:
            raise SuiteError("--weights and --model-path both give the float weights: give one")
        if args.weights == DEFAULT_WEIGHTS and not os.path.exists(DEFAULT_WEIGHTS):
            raise C.CheckpointError(f"--weights '{DEFAULT_WEIGHTS}' not found ({os.path.abspath(DEFAULT_WEIGHTS)}): "
                                    "QAT on --data fine-tunes trained weights, by default yolov5s.pt in the working "
                                    "directory; give --weights FILE (an ultralytics YOLOv5 .pt or this suite's "
                                    "checkpoint)")
        if args.weights:
            C.load_weights(args.weights, cfg=args.cfg if args.cfg_given else None)  # readable, before long work
        if not args.embedded:
            self.data_cfg = D.load_data_config(args.data)
        if not args.weights:  # the config builds (unknown modules, bad rows): before the data
            with torch.random.fork_rng(devices=[]):
                Model(load_config(args.cfg), nc=self.data_cfg["nc"] if self.data_cfg else None)

    def datasets(self, args) -> Data:
        if args.embedded:
            from suites.yolov5.synth import fashion_scenes
            self.data_cfg = fashion_scenes(*args.scenes, seed=args.seed or 0, cache_dir=args.cache_dir)
        cfg = self.data_cfg
        val, cat_ids, vskips = D.load_split(cfg, "val", args.on_bad_label)
        need_train = args.embedded or args.quantize or not args.evaluate  # training or calibration
        train, _c, tskips = D.load_split(cfg, "train", args.on_bad_label) if need_train else ([], None, D.Skips())
        if args.val_images:
            val = [val[i] for i in D.val_images(val, args.val_images, args.seed)]
        self.nc, self.names = cfg["nc"], list(cfg["names"])
        self.evaluator = E.Evaluator(val, cat_ids, self.names, args.conf_thres, args.iou_thres)
        self.skipped.update(train=tskips.counts, val=vskips.counts)
        size = args.img_size
        name = "synthetic Fashion-MNIST scenes" if args.embedded else args.data
        return Data(D.DetectionDataset(train, size, augment=True), D.DetectionDataset(train or val, size),
                    D.DetectionDataset(val, size), name=name)

    def extras(self, args, data: Data) -> dict:
        # the nested dicts are filled later: float training, the evaluations' files
        return {"img_size": args.img_size, "nc": self.nc, "scenes": list(args.scenes) if args.embedded else None,
                "skipped_labels": self.skipped, "float_train": self.float_record, "outputs": self.outputs}

    def cache_key(self, args) -> dict:
        from suites.yolov5.synth import VERSION
        return {"img_size": args.img_size, "float_steps": args.float_steps, "scenes": list(args.scenes),
                "scenes_version": VERSION, "hyp": args.float_hyp_values, "model": self.model_cfg}

    def checkpoint_extras(self, args) -> dict:
        return {"cfg": self.model_cfg, "img_size": args.img_size, "names": self.names}

    # ---- model
    def build_model(self, args, arch: str, pretrained: bool) -> nn.Module:
        """--weights (pretrained), else the config from scratch, seeded (the student's config for a teacher)."""
        if pretrained and args.weights:
            model = C.build_from_weights(args.weights, self.nc, cfg=args.cfg if args.cfg_given else None)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed or 0)
                model = Model(self.model_cfg or args.cfg, nc=self.nc)
        if self.model_cfg is None:  # the student: what the loss, the post-processing and the export need
            det = model.detect
            self.model_cfg = {k: v for k, v in model.yaml.items() if not k.startswith("_")}
            self.meta = {"anchors": det.anchors.tolist(), "strides": det.stride.tolist(), "nc": det.nc,
                         "names": self.names, "img_size": args.img_size}
            self.conv_layers = sum(isinstance(m, nn.Conv2d) for m in model.modules())
            self.criterion = YoloLoss(det.anchors, det.nc, args.hyp_values, args.img_size)
        return model

    def embedded_weights(self, args) -> bool:
        return bool(args.weights)

    def finetunes_float(self, args) -> bool:
        return args.embedded and not args.model_path and not args.weights and args.float_steps > 0

    def float_finetune(self, model, train_ds, args) -> None:
        """The embedded float model from scratch: --float-steps steps over the shuffled scenes (cycled), the float
        hyp's optimizer and schedule, EMA of the weights (the EMA is the result)."""
        from suites.yolov5.trainer import ModelEMA, train_steps
        hyp, seed = args.float_hyp_values, args.seed or 0
        torch.manual_seed(seed)
        dl = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, collate_fn=D.collate,
                                         generator=torch.Generator().manual_seed(seed),
                                         persistent_workers=args.workers > 0)
        ema = ModelEMA(model, decay=float(hyp.get("ema_decay", 0.999)), tau=float(hyp.get("ema_tau", 100)))
        r = train_steps(model, dl, args.float_steps, hyp, args.float_lr, model.detect.anchors, model.nc,
                        args.img_size, say, prefix="Float", ema=ema, device=args.device, print_freq=args.print_freq)
        model.load_state_dict(ema.ema.state_dict())
        self.float_record.update(steps=args.float_steps, loss=r["loss"], step_s=r["step_s"])

    def make_training(self, model, steps_per_epoch: int, args):
        """The hyp's optimizer (YOLOv5's groups: no decay on biases / BN / quantizer scales, nesterov SGD or AdamW
        with beta1 = momentum) and schedule (warmup_steps, cosine to lrf x --lr), for QAT and float training."""
        from suites.yolov5.trainer import make_optimizer, schedule
        hyp = args.hyp_values
        opt = make_optimizer(model, args.optim, args.lr, args.weight_decay, float(hyp.get("momentum", 0.937)))
        return opt, schedule(opt, steps_per_epoch * args.epochs, int(hyp.get("warmup_steps", 0)),
                             float(hyp.get("lrf", 0.01)))

    def after_calibration(self, q, args, m) -> None:
        rng = args.hyp_values.get("out_range")
        if rng:
            ranges = clip_output_ranges(q, float(rng[0]), float(rng[1]))
            say(f"=> output quantizer ranges clipped to [{rng[0]}, {rng[1]}]: {ranges}")
            if m is not None:
                m.extras["out_ranges"] = ranges

    def after_export(self, result, args, m) -> None:
        """The post-processing's metadata (anchors, strides, names) beside the ONNX files, for test.py."""
        from suites.common.checkpoints import output_paths
        for onnx_path in (result.onnx_path, output_paths(args)["bestonnx"]):
            write_meta(onnx_path, self.meta)
        m.files["onnx_meta"] = meta_path(result.onnx_path)
        m.extras["conv_layers"] = self.conv_layers

    # ---- batches, loss, metric
    def loss(self, output, target) -> torch.Tensor:
        loss, items = self.criterion(output, target)
        self.loss_items = tuple(items.tolist())  # the progress line's box / obj / cls
        return loss

    def distill_loss(self, output, teacher_output, target, args) -> torch.Tensor:
        """The detection loss + ``alpha x batch x`` the MSE between the student's and the teacher's raw Detect maps
        (per level, summed; the hyp's ``distill`` or --distill-alpha is alpha)."""
        kd = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(output, teacher_output)) * output[0].shape[0]
        return self.loss(output, target) + args.distill_alpha * kd

    def train_scores(self, output, target) -> tuple[float, ...]:
        return self.loss_items

    def dummy_input(self, args):
        return torch.rand(1, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))

    def describe(self, scores: dict) -> str:
        return (f"mAP@.5 {scores['map50']:.4f} mAP@.5:.95 {scores['map50_95']:.4f} (P {scores['precision']:.3f} "
                f"R {scores['recall']:.3f}, {scores['images']} images)")

    def evaluate(self, model, loader, args, prefix: str) -> dict:
        return self.score(E.torch_predictor(model, args.device), loader, args, prefix)

    def evaluate_onnx(self, session, loader, args, prefix: str) -> dict:
        return self.score(E.onnx_predictor(session, args.onnx_batch), loader, args, prefix)

    def score(self, predict, loader, args, prefix: str) -> dict:
        """COCO mAP of ``predict(images) -> raw maps``; for the float / QAT / ORT evaluations also the PR-curve PNG
        and (--save-json) the COCO results JSON beside the metrics."""
        res = self.evaluator.run(predict, loader, self.meta["anchors"], self.meta["strides"], prefix, log=say)
        stage = STAGE.get(prefix)
        if stage and is_main():
            base = os.path.join(os.path.dirname(os.path.abspath(args.metrics)), f"{args.arch}_{stage}_")
            E.plot_pr_curve(res.dets, res.records, self.names, base + "pr_curve.png",
                            f"{args.arch} {stage}: precision-recall at IoU 0.5")
            self.outputs[f"{stage}_pr_curve"] = base + "pr_curve.png"
            if args.save_json:
                E.save_json(res.coco_dets, base + "predictions.json")
                self.outputs[f"{stage}_predictions"] = base + "predictions.json"
                say(f"=> {len(res.coco_dets)} detections written to {base}predictions.json")
        return res.scores


def load_hyp(path: str, flag: str) -> dict:
    h = D.read_yaml(path, flag) or {}
    if not isinstance(h, dict):
        raise D.DataError(f"{flag} {path}: not a YAML mapping")
    return h


def clip_output_ranges(q, lo: float, hi: float) -> list:
    """Narrow the calibrated range of the network's output quantizers (the raw Detect maps) to [lo, hi].

    The raw maps are logits: background objectness / class logits reach -18..-30, which min/max calibration
    must cover, so one uint8 step is 0.1-0.16 and box regressions lose precision (mAP@.5:.95 -1.7 points on the
    default). Below -6 the sigmoid is < 0.0025 and above 6 it is > 0.9975: clipping there changes no decision,
    and the step shrinks to 12/255. The core has no per-quantizer range override, so this sets the calibrated
    (scale, zero point) of those quantizers from the clipped range; LSQ then keeps learning the scale."""
    from ts_qat_pytorch.observer import qparams_from_minmax
    q = getattr(q, "module", q)
    out = next(n for n in q.graph.nodes if n.op == "output")
    args = out.args[0] if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    ranges = []
    for a in args:
        fq = q.get_submodule(a.target) if a.op == "call_module" else None
        if fq is None or not hasattr(fq, "qparams") or not hasattr(fq, "scheme"):
            continue
        s, z = fq.qparams()
        cur_lo, cur_hi = (fq.quant_min - z.float()) * s, (fq.quant_max - z.float()) * s
        ns, nz = qparams_from_minmax(torch.clamp(cur_lo, min=lo), torch.clamp(cur_hi, max=hi), fq.scheme)
        with torch.no_grad():
            fq.scale.copy_(ns.reshape(fq.scale.shape))
            fq.zero_point.copy_(nz.reshape(fq.zero_point.shape).to(fq.zero_point.dtype))
        ranges.append([round(float(cur_lo), 2), round(float(cur_hi), 2), round(float(ns), 5)])
    return ranges


SUITE = Yolov5Suite()
