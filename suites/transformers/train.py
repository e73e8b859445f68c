"""Training, scoring, ONNX evaluation and latency helpers of the transformers suite."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from suites.common.meters import AverageMeter, ProgressMeter
from suites.common.distributed import is_main, say  # noqa: F401 - the suite's modules log through say
from suites.common.training import kd_loss
from suites.transformers.data import trim_batch
from suites.transformers.model import attention_bias

logger = logging.getLogger("transformers_suite")


def qat_param_groups(model, lr: float, qparam_lr: float | None):
    """Weights at ``lr``; the quantizers' learned scales / zero points at ``qparam_lr`` (None: ``lr``). Adam moves
    a parameter by about its learning rate per step, so at a weight's rate (1e-5) a 40-step QAT barely moves an
    activation scale of ~0.05. Moving them faster did not help the embedded default: scales at 1e-3 scored 78.67
    against 79.50 (README)."""
    if not qparam_lr or qparam_lr == lr:
        return model.parameters()
    from ts_qat_pytorch.fake_quantize import QuantizeBase
    qparams = {id(p) for m in model.modules() if isinstance(m, QuantizeBase) for p in m.parameters(recurse=False)}
    rest = [p for p in model.parameters() if id(p) not in qparams]
    quant = [p for p in model.parameters() if id(p) in qparams]
    return [{"params": rest, "lr": lr}, {"params": quant, "lr": qparam_lr, "weight_decay": 0.0}]


def hf_forward(model):
    """A (ids, mask) -> logits callable for a Hugging Face classifier."""
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def split_forward(model):
    """A (ids, mask) -> logits callable for the split (float or prepared): the mask is prepared outside."""
    return lambda ids, mask: model(ids, attention_bias(mask))


def train_epoch(loader, forward, params_model, optimizer, scheduler, epoch: int, args, teacher=None,
                max_steps: int | None = None, prefix: str = "Epoch") -> float:
    """One pass (or ``max_steps`` steps) over ``loader``; kd from ``teacher`` (ids, mask -> logits) if given."""
    losses, accs, bt = AverageMeter("Loss", ":.4f"), AverageMeter("Acc", ":6.2f"), AverageMeter("Time", ":6.3f")
    n = len(loader) if max_steps is None else min(len(loader), max_steps)
    progress = ProgressMeter(n, [bt, losses, accs], prefix=f"{prefix}: [{epoch}]", print_freq=args.print_freq,
                             printer=logger.info, enabled=is_main())
    params_model.train()
    end = time.time()
    for i, (ids, mask, y) in enumerate(loader):
        if i >= n:
            break
        ids, mask = trim_batch(ids, mask)
        out = forward(ids, mask)
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(ids, mask)
            loss = kd_loss(out, t_out, y, args.distill_alpha, args.temperature)
        else:
            loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_model.parameters(), 1.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.update(loss.item(), len(y))
        accs.update(100.0 * (out.argmax(1) == y).float().mean().item(), len(y))
        bt.update(time.time() - end)
        end = time.time()
        progress.step(i)
    progress.close()
    return losses.avg


def scores(pred: np.ndarray, y: np.ndarray, num_labels: int) -> dict:
    """Accuracy (%) and macro-F1 (%)."""
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (y == c)).sum())
        fp, fn = int(((pred == c) & (y != c)).sum()), int(((pred != c) & (y == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": round(100.0 * float((pred == y).mean()), 3), "macro_f1": round(100.0 * float(np.mean(f1s)), 3)}


@torch.no_grad()
def evaluate(loader, forward, model, num_labels: int, prefix: str = "Test") -> dict:
    model.eval()
    preds, ys = [], []
    t = time.time()
    for ids, mask, y in loader:
        ids, mask = trim_batch(ids, mask)
        preds.append(forward(ids, mask).argmax(1).numpy())
        ys.append(y.numpy())
    s = scores(np.concatenate(preds), np.concatenate(ys), num_labels)
    say(f" * {prefix} accuracy {s['accuracy']:.2f} macro-F1 {s['macro_f1']:.2f} ({len(loader.dataset)} "
        f"examples, {time.time() - t:.1f} s)")
    return s


def onnx_predict(sess, ids: np.ndarray, mask: np.ndarray, batch: int, length: int) -> np.ndarray:
    """Logits from an exported split model with a static (batch, length) input: pads rows and columns."""
    names = [i.name for i in sess.get_inputs()]
    out = []
    for s in range(0, len(ids), batch):
        i, m = ids[s:s + batch], mask[s:s + batch]
        k = len(i)
        pi, pm = np.zeros((batch, length), np.int64), np.zeros((batch, length), np.int64)
        pm[:, 0] = 1  # padding rows attend to one token, so their softmax is defined
        pi[:k, :i.shape[1]], pm[:k, :m.shape[1]] = i, m
        bias = attention_bias(torch.from_numpy(pm)).numpy()
        out.append(sess.run(None, {names[0]: pi, names[1]: bias})[0][:k])
    return np.concatenate(out)


def ort_latency(paths: dict[str, str], batch: int, length: int, threads: int | None, repeats: int = 10) -> dict:
    """Median wall time (ms) of one (batch, length) forward of each model in onnxruntime, after warm-up. The models
    take turns run by run, so a noisy neighbour on the machine slows both alike and the ratio stays honest."""
    from ts_qat_pytorch.onnx.verify import ort_session
    g = np.random.default_rng(0)
    ids = g.integers(1000, 2000, (batch, length)).astype(np.int64)
    sessions, feeds = {}, {}
    for k, path in paths.items():
        sessions[k] = ort_session(path, threads=threads)
        names = [i.name for i in sessions[k].get_inputs()]
        feeds[k] = {names[0]: ids, names[1]: np.zeros((batch, 1, 1, length), np.float32)}
        for _ in range(2):
            sessions[k].run(None, feeds[k])
    ts = {k: [] for k in paths}
    for _ in range(repeats):
        for k in paths:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            ts[k].append(1000 * (time.perf_counter() - t))
    return {k: round(float(np.median(v)), 2) for k, v in ts.items()}
