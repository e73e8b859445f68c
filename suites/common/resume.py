"""What a resumed run keeps from its checkpoint, said in the log: the learning rate of a restored optimizer and LR
schedule wins over the command line's (--resume continues the run as it was started)."""
from __future__ import annotations

import math


def checkpoint_lr(ckpt) -> float | None:
    """The base learning rate (first parameter group) a checkpoint of ``save_qat_checkpoint`` restores: the LR
    schedule's ``base_lrs``, else the optimizer's ``initial_lr`` / ``lr``; None when it holds neither."""
    if not isinstance(ckpt, dict):
        return None
    sched = ckpt.get("scheduler")
    if isinstance(sched, dict) and sched.get("base_lrs"):
        return float(sched["base_lrs"][0])
    opt = ckpt.get("optimizer")
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if groups:
        g = groups[0]
        lr = g.get("initial_lr", g.get("lr"))
        return None if lr is None else float(lr)
    return None


def lr_change_message(ckpt, lr: float | None, path: str, given: bool = True, flag: str = "--lr") -> str | None:
    """A warning line when ``lr`` (the command line's, or its default when not ``given``) differs from the learning
    rate that ``ckpt`` restores; None when they agree or the checkpoint restores none."""
    old = checkpoint_lr(ckpt)
    if old is None or lr is None or math.isclose(old, lr, rel_tol=1e-6, abs_tol=0.0):
        return None
    which = f"{flag} {lr:g}" if given else f"{flag} {lr:g} (the default)"
    return (f"{which} differs from the learning rate {old:g} of --resume '{path}': the checkpoint's {old:g} is used "
            f"(--resume restores the optimizer and the LR schedule, so the run continues as it was started)")
