"""Stage 2 of the pipeline: the float model. Built by the suite, its --model-path weights loaded, fine-tuned on the
embedded data (``cfg.finetune_float``; cached, keyed by the recipe), or trained with --data --not-qat."""
from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from suites.common import distributed as D
from suites.common.checkpoints import atomic_copy, load_float_weights
from suites.common.history import epoch_row
from suites.common.stages.evaluate import evaluate
from suites.common.training import EpochSubsetSampler, Training, cosine_schedule, loader, make_optimizer, train_epoch

logger = logging.getLogger("suites")
say = D.say


def build(run, suite) -> nn.Module:
    """The student's float model: the zoo's weights when asked (or the embedded default's), then --model-path."""
    cfg = run.config
    pretrained = cfg.pretrained or (cfg.embedded and not cfg.model_path and cfg.embedded_weights)
    model = suite.build_model(cfg, cfg.arch, pretrained=pretrained)
    if cfg.model_path:
        load_float_weights(model, cfg.model_path, "--model-path", cfg.num_classes)
        say(f"=> loaded float weights '{cfg.model_path}'")
    return run.stage_end("float_model", model)


def layout(suite) -> torch.memory_format:
    return torch.channels_last if suite.channels_last else torch.contiguous_format


def cache_path(run, suite) -> tuple[str, dict]:
    """The float fine-tune's cache file and the recipe it is keyed by."""
    from suites.common.assets import cache_dir, cache_file
    cfg = run.config
    key = dict(arch=cfg.arch, float_epochs=cfg.float_epochs, float_images=cfg.float_images, float_lr=cfg.float_lr,
               batch_size=cfg.batch_size, seed=cfg.seed, recipe=1, **run.data.cache_key)
    folder = cfg.cache_dir or os.path.join(cache_dir(), suite.name)
    return cache_file(folder, f"{cfg.arch}_{suite.cache_tag}_float", key), key


def cached(path: str, key: dict) -> dict | None:
    """The cached fine-tuned float model's state_dict when the file holds the recipe ``key``'s; None otherwise."""
    from ts_qat_pytorch.utils.utils import load_checkpoint
    if not os.path.exists(path):
        return None
    try:
        ck = load_checkpoint(path)
        if ck.get("key") != key:
            raise ValueError("recipe differs")
        return ck["state_dict"]
    except Exception as exc:  # noqa: BLE001 - any problem: train again
        logger.warning("float cache %s unusable (%s); fine-tuning again", path, exc)
        return None


def float_finetune(run, suite, model: nn.Module) -> None:
    """Fine-tune the float model (``suite.float_finetune``, rank 0), or reuse the cached
    result. Rank 0 decides whether the cache is used: a rank that looked for itself could find the file rank 0 has
    just written and skip the barrier the others wait in."""
    from ts_qat_pytorch.utils.utils import atomic_torch_save, load_checkpoint
    m = run.metrics
    path, key = cache_path(run, suite)
    state = cached(path, key) if D.is_main() else None
    if D.broadcast_object(state is not None):
        model.load_state_dict(state if state is not None else load_checkpoint(path)["state_dict"])
        say(f"=> reusing the fine-tuned float model {path}")
        m.run["float_cached"] = True
        m["times_s"]["float_train"] = 0.0
        return
    m.run["float_cached"] = False
    with m.timed("float_train"):
        if D.is_main():
            model.to(run.device, memory_format=layout(suite))
            suite.float_finetune(model, run.data.train, run)
            model.to("cpu", memory_format=torch.contiguous_format)
            atomic_torch_save({"state_dict": model.state_dict(), "key": key}, path)
            say(f"=> fine-tuned float model cached at {path}")
        if run.distributed:
            D.barrier()
            if not D.is_main():
                model.load_state_dict(load_checkpoint(path)["state_dict"])
    run.stage_end("float_finetune", model)


def train_float(run, suite, model: nn.Module) -> None:
    """Plain float training with --data --not-qat (pytorch/examples behaviour, cosine per-step LR): the float
    weights after each epoch, and the best epoch's."""
    from ts_qat_pytorch.utils.utils import atomic_torch_save
    cfg, m, paths = run.config, run.metrics, run.paths
    train_ds = run.data.train
    sampler = EpochSubsetSampler(len(train_ds), cfg.train_images, cfg.seed or 0, run.rank, run.world)
    dl = loader(train_ds, max(1, cfg.batch_size // run.world), cfg.workers, sampler=sampler,
                collate_fn=suite.collate)
    mm = model
    if run.distributed:
        mm = nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index]
                                                 if run.device.type == "cuda" else None)
    opt, sched = suite.make_training(model, len(dl), cfg) or (None, None)
    if opt is None:
        opt = make_optimizer(model.parameters(), cfg.optim, cfg.lr, cfg.momentum, cfg.weight_decay)
        sched = cosine_schedule(opt, len(dl) * cfg.epochs)
    best = None
    for epoch in range(cfg.start_epoch, cfg.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        with m.timed("float_train"):
            trained = train_epoch(run, dl, mm, Training(opt, sched), epoch)
        if D.is_main():
            value = evaluate(run, model, "float")
            atomic_torch_save(model.state_dict(), paths["float"])
            m.files["float_checkpoint"] = paths["float"]
            if best is None or suite.metric.better(value, best):
                best = value
                atomic_copy(paths["float"], paths["best_float"])
            m.epoch_done(epoch_row("float", epoch, trained, {suite.metric.name: value}, opt.param_groups[0]["lr"],
                                   time.time() - t0))
