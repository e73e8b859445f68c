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


class Yolov5Suite(Suite):
    name = "yolov5"
    script = "train_qat.py"
    metric = Metric("map50_95", "higher", ".4f")
    summary = ("mAP@.5 {map50:.4f} mAP@.5:.95 {map50_95:.4f} (P {precision:.3f} R {recall:.3f}, {images} "
               "images)")
    digits = 4
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
    smoke = SMOKE
    errors = (ConfigError, D.DataError, C.CheckpointError)
    train_meters = (("box", ":.4f"), ("obj", ":.4f"), ("cls", ":.4f"))
    channels_last = False
    collate = staticmethod(D.collate)
    cache_tag = "scenes"

    def __init__(self):
        # what a run learns: the classes and the evaluator (datasets), the student's config, anchors and loss
        # (on_stage_end "float_model"); the runner runs a copy of the suite per run
        self.nc = self.names = self.evaluator = None
        self.model_cfg = self.meta = self.criterion = None

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

    def recipe(self, flags) -> dict:
        """The flags' defaults: the embedded or general recipe, then the hyp YAML's (lr0 -> --lr, optimizer, weight
        decay, calib_batches, freeze_bn_step -> --freeze-bn-epoch, distill -> --distill-method kd). Also resolves
        what the manual's flags mean for the runner: --quantize (else --not-qat), --export-only (-e)."""
        if flags.quantize and flags.not_qat:
            raise SuiteError("--quantize and --not-qat contradict each other: give --quantize for QAT, neither for "
                             "float training / evaluation")
        flags.not_qat = not flags.quantize
        flags.evaluate = flags.evaluate or flags.export_only
        flags.cfg_given = flags.cfg is not None
        rec = dict(self.recipes["embedded" if flags.embedded else "general"])
        scratch = os.path.join(HERE, "data", "hyp.scratch.yaml")
        path = flags.hyp or (os.path.join(HERE, "data", "hyp.qat.yaml") if flags.quantize else scratch)
        flags.hyp_values = hyp = load_hyp(path, "--hyp")
        flags.float_hyp_values = load_hyp(scratch, "--hyp") if flags.quantize else hyp
        rec.update(hyp=path, lr=float(hyp.get("lr0", 5e-4 if flags.quantize else 0.01)),
                   optim=str(hyp.get("optimizer", "sgd")).lower(),
                   weight_decay=float(hyp.get("weight_decay", 0.0 if flags.quantize else 5e-4)),
                   float_lr=float(flags.float_hyp_values.get("lr0", 0.003)))
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
        if flags.pretrained or (not flags.embedded and flags.quantize and not flags.resume and not flags.model_path):
            rec["weights"] = DEFAULT_WEIGHTS
        return rec

    def check(self, flags) -> dict:
        if flags.img_size < 32 or flags.img_size % 32:
            raise SuiteError(f"--img-size {flags.img_size} must be a multiple of 32 (the largest stride)")
        if min(flags.scenes) < 1 or flags.float_steps < 0:
            raise SuiteError("--scenes must both be >= 1 and --float-steps >= 0")
        for flag, v in (("--conf-thres", flags.conf_thres), ("--iou-thres", flags.iou_thres)):
            if not 0.0 <= v <= 1.0:
                raise SuiteError(f"{flag} {v} must be within 0..1")
        if flags.optim not in ("sgd", "adam", "adamw"):
            raise SuiteError(f"optimizer '{flags.optim}' (--hyp {flags.hyp} or --optim) must be sgd, adam or adamw")
        if flags.resume and not flags.quantize:
            raise SuiteError("--resume restores a QAT checkpoint (train_qat.py --quantize writes them): add "
                             "--quantize; float weights go to --weights")
        if flags.weights and flags.model_path:
            raise SuiteError("--weights and --model-path both give the float weights: give one")
        # the config's name, or the --weights file's when the model comes from it (yolov5s.pt -> yolov5s)
        src = flags.weights if flags.weights and not flags.cfg_given else flags.cfg
        resolved = dict(arch=os.path.splitext(os.path.basename(str(src)))[0], pretrained=bool(flags.weights),
                        embedded_weights=bool(flags.weights),
                        finetune_float=flags.embedded and not flags.model_path and not flags.weights
                        and flags.float_steps > 0)
        if flags.project is not None or flags.name is not None:
            resolved["out_dir"] = project_dir(flags.project, flags.name, flags.exist_ok)
        return resolved

    # ---- data and model
    def datasets(self, cfg) -> Data:
        """The files first (weights, data config, model config: before the data), then the data sets."""
        if cfg.weights == DEFAULT_WEIGHTS and not os.path.exists(DEFAULT_WEIGHTS):
            raise C.CheckpointError(f"--weights '{DEFAULT_WEIGHTS}' not found ({os.path.abspath(DEFAULT_WEIGHTS)}): "
                                    "QAT on --data fine-tunes trained weights, by default yolov5s.pt in the working "
                                    "directory; give --weights FILE (an ultralytics YOLOv5 .pt or this suite's "
                                    "checkpoint)")
        if cfg.weights:
            C.load_weights(cfg.weights, cfg=cfg.cfg if cfg.cfg_given else None)  # readable
        if cfg.embedded:
            from suites.yolov5.synth import fashion_scenes
            dcfg = fashion_scenes(*cfg.scenes, seed=cfg.seed or 0, cache_dir=cfg.cache_dir)
        else:
            dcfg = D.load_data_config(cfg.data)
        if not cfg.weights:  # the config builds (unknown modules, bad rows)
            with torch.random.fork_rng(devices=[]):
                Model(load_config(cfg.cfg), nc=None if cfg.embedded else dcfg["nc"])
        val, cat_ids, vskips = D.load_split(dcfg, "val", cfg.on_bad_label)
        need_train = cfg.embedded or cfg.quantize or not cfg.evaluate  # training or calibration
        train, _c, tskips = D.load_split(dcfg, "train", cfg.on_bad_label) if need_train else ([], None, D.Skips())
        if cfg.val_images:
            val = [val[i] for i in D.val_images(val, cfg.val_images, cfg.seed)]
        self.nc, self.names = dcfg["nc"], list(dcfg["names"])
        self.evaluator = E.Evaluator(val, cat_ids, self.names, cfg.conf_thres, cfg.iou_thres)
        size = cfg.img_size
        from suites.yolov5.synth import VERSION
        facts = {"img_size": size, "nc": self.nc, "scenes": list(cfg.scenes) if cfg.embedded else None,
                 "skipped_labels": {"train": tskips.counts, "val": vskips.counts}, "float_train": {}, "outputs": {}}
        key = {"img_size": size, "float_steps": cfg.float_steps, "scenes": list(cfg.scenes),
               "scenes_version": VERSION, "hyp": cfg.float_hyp_values}  # + "model": the student's config
        return Data(D.DetectionDataset(train, size, augment=True), D.DetectionDataset(train or val, size),
                    D.DetectionDataset(val, size), name="synthetic Fashion-MNIST scenes" if cfg.embedded else cfg.data,
                    example=torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)), facts=facts,
                    checkpoint={"cfg": None, "img_size": size, "names": self.names}, cache_key=key)

    def build_model(self, cfg, arch: str, pretrained: bool) -> nn.Module:
        """--weights (pretrained), else the config from scratch, seeded (the student's config for a teacher)."""
        if pretrained and cfg.weights:
            return C.build_from_weights(cfg.weights, self.nc, cfg=cfg.cfg if cfg.cfg_given else None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed or 0)
            return Model(self.model_cfg or cfg.cfg, nc=self.nc)

    # ---- training
    def float_finetune(self, model, train_ds, run) -> None:
        """The embedded float model from scratch: --float-steps steps over the shuffled scenes (cycled), the float
        hyp's optimizer and schedule, EMA of the weights (the EMA is the result)."""
        from suites.yolov5.trainer import ModelEMA, StepPlan, train_steps
        cfg = run.config
        hyp, seed = cfg.float_hyp_values, cfg.seed or 0
        torch.manual_seed(seed)
        dl = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.workers, collate_fn=D.collate,
                                         generator=torch.Generator().manual_seed(seed),
                                         persistent_workers=cfg.workers > 0)
        ema = ModelEMA(model, decay=float(hyp.get("ema_decay", 0.999)), tau=float(hyp.get("ema_tau", 100)))
        plan = StepPlan(cfg.float_steps, cfg.float_lr, cfg.img_size, run.device, "Float", cfg.print_freq)
        r = train_steps(model, dl, hyp, plan, ema=ema)
        model.load_state_dict(ema.ema.state_dict())
        run.metrics.extras["float_train"].update(steps=cfg.float_steps, loss=r["loss"], step_s=r["step_s"])

    def make_training(self, model, steps_per_epoch: int, cfg):
        """The hyp's optimizer (YOLOv5's groups: no decay on biases / BN / quantizer scales, nesterov SGD or AdamW
        with beta1 = momentum) and schedule (warmup_steps, cosine to lrf x --lr), for QAT and float training."""
        from suites.yolov5.trainer import make_optimizer, schedule
        hyp = cfg.hyp_values
        opt = make_optimizer(model, cfg.optim, cfg.lr, cfg.weight_decay, float(hyp.get("momentum", 0.937)))
        return opt, schedule(opt, steps_per_epoch * cfg.epochs, int(hyp.get("warmup_steps", 0)),
                             float(hyp.get("lrf", 0.01)))

    def loss(self, output, target, teacher_output=None, cfg=None):
        """The detection loss (+ with a teacher ``alpha x batch x`` the MSE between the student's and the teacher's
        raw Detect maps, per level, summed; the hyp's ``distill`` or --distill-alpha is alpha); the meters: its box /
        obj / cls parts."""
        loss, items = self.criterion(output, target)
        if teacher_output is not None:
            kd = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(output, teacher_output)) * output[0].shape[0]
            loss = loss + cfg.distill_alpha * kd
        return loss, tuple(items.tolist())

    # ---- metric
    def evaluate(self, model, loader, run, prefix: str) -> dict:
        return self.score(E.torch_predictor(model, run.device), loader, prefix)

    def evaluate_onnx(self, session, loader, run, prefix: str) -> dict:
        return self.score(E.onnx_predictor(session, run.config.onnx_batch), loader, prefix)

    def score(self, predict, loader, prefix: str) -> dict:
        """COCO mAP of ``predict(images) -> raw maps``; the detections as the detail (on_stage_end writes them)."""
        res = self.evaluator.run(predict, loader, self.meta["anchors"], self.meta["strides"], prefix, log=say)
        return {**res.scores, "detail": res}

    # ---- events
    def on_stage_end(self, run, stage: str, result) -> None:
        cfg, m = run.config, run.metrics
        if stage == "float_model":  # the student: what the loss, the post-processing and the export need
            det = result.detect
            self.model_cfg = {k: v for k, v in result.yaml.items() if not k.startswith("_")}
            run.data.checkpoint["cfg"] = run.data.cache_key["model"] = self.model_cfg
            self.meta = {"anchors": det.anchors.tolist(), "strides": det.stride.tolist(), "nc": det.nc,
                         "names": self.names, "img_size": cfg.img_size}
            self.criterion = YoloLoss(det.anchors, det.nc, cfg.hyp_values, cfg.img_size)
            m.extras["conv_layers"] = sum(isinstance(x, nn.Conv2d) for x in result.modules())
        elif stage == "calibration" and cfg.hyp_values.get("out_range"):
            lo, hi = cfg.hyp_values["out_range"]
            m.extras["out_ranges"] = ranges = clip_output_ranges(result, float(lo), float(hi))
            say(f"=> output quantizer ranges clipped to [{lo}, {hi}]: {ranges}")
        elif stage == "export":  # the post-processing's metadata beside the ONNX files, for test.py
            for onnx_path in (result.onnx_path, run.paths["bestonnx"]):
                write_meta(onnx_path, self.meta)
            m.files["onnx_meta"] = meta_path(result.onnx_path)
        elif stage in ("float_eval", "qat_eval", "ort_eval") and is_main():
            self.write_evaluation(run, stage[:-5], result.detail)

    def write_evaluation(self, run, stage: str, res) -> None:
        """The PR-curve PNG and (--save-json) the COCO results JSON of an evaluation, beside the metrics."""
        cfg, outputs = run.config, run.metrics.extras["outputs"]
        base = os.path.join(os.path.dirname(os.path.abspath(cfg.metrics)), f"{cfg.arch}_{stage}_")
        E.plot_pr_curve(res.dets, res.records, self.names, base + "pr_curve.png",
                        f"{cfg.arch} {stage}: precision-recall at IoU 0.5")
        outputs[f"{stage}_pr_curve"] = base + "pr_curve.png"
        if cfg.save_json:
            E.save_json(res.coco_dets, base + "predictions.json")
            outputs[f"{stage}_predictions"] = base + "predictions.json"
            say(f"=> {len(res.coco_dets)} detections written to {base}predictions.json")


def project_dir(project: str | None, name: str | None, exist_ok: bool) -> str:
    """ultralytics' PROJECT/NAME (NAME, NAME2, NAME3 ... unless --exist-ok)."""
    path = os.path.join(project or os.path.join("runs", "train"), name or "exp")
    if exist_ok or not os.path.exists(path):
        return path
    n = 2
    while os.path.exists(f"{path}{n}"):
        n += 1
    return f"{path}{n}"


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
