"""Float training on user data (train_qat.py without --quantize): epochs over the training set, EMA,
evaluation after each epoch, last and best (mAP@.5:.95) checkpoints in --output_dir."""
from __future__ import annotations

import os

import torch.distributed as dist
import torch.nn as nn

from . import ckpt as C
from . import pipeline as P
from .evaluate import torch_predictor
from .trainer import ModelEMA, train_steps


def train_float_epochs(model, train, ev: P.Evaluator, hyp: dict, args, stages) -> None:
    name = args.name
    dl, sampler = P.train_loader(train, args.img_size, args.batch_size, args.workers, args.seed)
    ema = ModelEMA(model, tau=float(hyp.get("ema_tau", 2000)))
    mm = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    steps = args.steps or args.epochs * len(dl)
    best = -1.0
    last = os.path.join(args.output_dir, f"{name}_float_last.pt")

    def on_step(step):
        nonlocal best
        if (step + 1) % len(dl) and step + 1 != steps:
            return
        if not P.is_main():
            return
        with stages.timed("float_eval"):
            r = ev.run(torch_predictor(ema.ema, args.device), f"Float epoch {(step + 1) // len(dl)}")
        ema.ema.train(False)
        stages.score("float", r)
        C.save_float(last, ema.ema, step=step + 1)
        if r["map50_95"] > best:
            best = r["map50_95"]
            C.save_float(os.path.join(args.output_dir, f"{name}_float_best.pt"), ema.ema, step=step + 1)
        mm.train()
    with stages.timed("float_train"):
        r = train_steps(mm, dl, steps, hyp, float(hyp.get("lr0", 0.01)), model.detect.anchors, model.nc,
                        args.img_size, P.say, prefix="Float", ema=ema, sampler=sampler, device=args.device,
                        on_step=on_step)
    stages.run.update(float_steps=steps, float_train_loss=r["loss"])
    stages.files["float_checkpoint"] = last
