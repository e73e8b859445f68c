"""Stand-in for the core's ``ts_qat_pytorch.utils.calibrate.calibrate`` until it is on this branch (same
signature and behaviour); removed when main is merged."""
from __future__ import annotations

import torch


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def calibrate(model, batches, num_batches=None, forward=None):
    from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    enable_calibration(model)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            batch = _to(batch, device)
            forward(model, batch) if forward is not None else model(batch)
    model.train(was_training)
    enable_quantization(model)
    return model
