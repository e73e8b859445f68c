"""Checkpoints: this suite's own (plain dicts of tensors + the model config, loaded with ``weights_only=True``)
and the ``.pt`` files written by the ultralytics YOLOv5 repository, which pickle whole model objects
(``models.yolo.Model``, ``models.common.Conv``, ...). Those load WITHOUT that code through a restricted
unpickler: exactly the classes below are mapped onto this suite's modules (or torch's own); any other global
is refused with an error naming it. The result is converted to a plain float32 state_dict."""
from __future__ import annotations

import os
import pickle
import types

import torch
import torch.nn as nn

from .models import common, yolo


class CheckpointError(ValueError):
    pass


def _allowed() -> dict:
    a = {("models.yolo", "Model"): yolo.Model, ("models.yolo", "DetectionModel"): yolo.Model,  # v7.0 name
         ("models.yolo", "Detect"): yolo.Detect}
    for n in ("Conv", "Focus", "Bottleneck", "BottleneckCSP", "C3", "SPP", "SPPF", "Concat"):
        a[("models.common", n)] = getattr(common, n)
    torch_nn = {"container": ("Sequential", "ModuleList"), "conv": ("Conv2d",), "batchnorm": ("BatchNorm2d",),
                "activation": ("SiLU", "Hardswish", "LeakyReLU", "ReLU"), "pooling": ("MaxPool2d",),
                "upsampling": ("Upsample",), "linear": ("Identity",)}
    for mod, names in torch_nn.items():
        for n in names:
            a[(f"torch.nn.modules.{mod}", n)] = getattr(nn, n)
    import torch._utils as tu
    for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        if hasattr(tu, n):
            a[("torch._utils", n)] = getattr(tu, n)
    import collections
    a[("collections", "OrderedDict")] = collections.OrderedDict
    for m in ("builtins", "__builtin__"):  # nn.Module keeps _non_persistent_buffers_set
        a[(m, "set")], a[(m, "frozenset")] = set, frozenset
    for n in ("float16", "float32", "float64", "int64", "Size"):
        a[("torch", n)] = getattr(torch, n)
    try:  # numpy scalars / arrays of numbers (best_fitness in some versions); never object arrays
        import codecs

        import numpy as np
        try:
            from numpy._core import multiarray as ma
        except ImportError:  # numpy < 2
            from numpy.core import multiarray as ma
        a[("_codecs", "encode")] = codecs.encode  # numpy's byte buffers under pickle protocol 2 (torch allows it too)
        for m in ("numpy.core.multiarray", "numpy._core.multiarray"):
            a[(m, "_reconstruct")] = ma._reconstruct
            a[(m, "scalar")] = ma.scalar
        a[("numpy", "ndarray")] = np.ndarray
        a[("numpy", "dtype")] = np.dtype
    except Exception:  # noqa: BLE001
        pass
    return a


class RestrictedUnpickler(pickle.Unpickler):
    ALLOWED: dict | None = None

    def find_class(self, module, name):
        allowed = RestrictedUnpickler.ALLOWED
        if allowed is None:
            allowed = RestrictedUnpickler.ALLOWED = _allowed()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load the global '{module}.{name}': the YOLOv5 checkpoint loader "
                                     "allows only the YOLOv5 model classes and torch tensors/modules")


def _load(f, **kw):
    return RestrictedUnpickler(f, **kw).load()


restricted_pickle = types.ModuleType("yolov5_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _load
restricted_pickle.__name__ = "yolov5_restricted_pickle"


def _infer_act(model: nn.Module) -> str | None:
    for m in model.modules():
        if isinstance(m, common.Conv) and "act" in m._modules:
            act = m._modules["act"]
            for name, cls in (("silu", nn.SiLU), ("hardswish", nn.Hardswish), ("leakyrelu", nn.LeakyReLU),
                              ("relu", nn.ReLU)):
                if isinstance(act, cls):
                    return name
    return None


def _unreadable(flag: str, path: str, exc: BaseException) -> CheckpointError:
    msg = (str(exc).splitlines() or [""])[0][:200]
    return CheckpointError(f"{flag} '{path}' could not be read ({type(exc).__name__}: {msg}): the file is truncated, "
                           "corrupt or not a PyTorch checkpoint; give this suite's .pt or an ultralytics YOLOv5 .pt")


def load_ultralytics(path: str, flag: str = "--weights") -> tuple[dict, dict]:
    """(model config dict, float32 state_dict) of a YOLOv5 ``.pt`` written by the ultralytics repository."""
    try:
        # Unpickling goes through RestrictedUnpickler, which resolves only the named YOLOv5 / torch classes and
        # refuses every other global (ultralytics .pt files pickle whole models, which weights_only cannot read).
        ck = torch.load(path, map_location="cpu", pickle_module=restricted_pickle,
                        weights_only=False)  # safe: restricted unpickler (above)
    except pickle.UnpicklingError as exc:
        if "refusing to load the global" in str(exc):
            raise CheckpointError(f"{flag} '{path}': {exc}") from exc
        raise _unreadable(flag, path, exc) from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, EOF, garbage bytes: all "unreadable"
        raise _unreadable(flag, path, exc) from exc
    model = ck.get("ema") or ck.get("model") if isinstance(ck, dict) else ck
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{flag} '{path}': no 'model' object in the checkpoint "
                              f"({'keys ' + str(list(ck)[:8]) if isinstance(ck, dict) else type(ck).__name__})")
    cfg = getattr(model, "__dict__", {}).get("yaml")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{flag} '{path}': the pickled model carries no YAML config")
    cfg = dict(cfg)
    if "act" not in cfg:
        cfg["act"] = _infer_act(model) or "silu"
    sd = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()
          if not k.endswith("anchor_grid")}
    return cfg, sd


def save_float(path: str, model: yolo.Model, **extra) -> None:
    from ts_qat_pytorch.utils.utils import atomic_torch_save
    cfg = {k: v for k, v in model.yaml.items() if not k.startswith("_")}
    atomic_torch_save({"state_dict": model.state_dict(), "cfg": cfg, **extra}, path)


def check_file(path: str, flag: str = "--weights") -> None:
    """Clear errors for a path that is missing, a directory or empty (before torch.load sees it)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{flag} '{path}' not found")
    if os.path.isdir(path):
        raise CheckpointError(f"{flag} '{path}' is a directory; give the checkpoint file inside it")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{flag} '{path}' is empty (0 bytes): it was not written completely; "
                              "copy or download it again")


def load_weights(path: str, flag: str = "--weights", cfg=None) -> tuple[dict, dict]:
    """(config, state_dict) of this suite's checkpoint, of an ultralytics ``.pt``, or (with ``cfg``, the model
    config) of a bare state_dict such as the runner's ``<arch>_checkpoint_float.pth``. Every unreadable file
    (missing, a directory, empty, truncated, garbage) is a CheckpointError naming ``flag`` and the file."""
    check_file(path, flag)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # whole pickled objects (ultralytics), or bytes that are no pickle at all
        return load_ultralytics(path, flag)
    except Exception as exc:  # noqa: BLE001 - truncated zip (RuntimeError), EOFError, KeyError on garbage, ...
        raise _unreadable(flag, path, exc) from exc
    if isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict) and isinstance(ck.get("cfg"), dict):
        return ck["cfg"], ck["state_dict"]
    sd = ck.get("state_dict") if isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict) else ck
    if isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
        if cfg is None:
            raise CheckpointError(f"{flag} '{path}' is a bare state_dict (e.g. train_qat.py's "
                                  "<arch>_checkpoint_float.pth): give --cfg, the model config it belongs to")
        from ts_qat_pytorch.utils.utils import strip_module_prefix
        return yolo.load_config(cfg), strip_module_prefix(sd)
    raise CheckpointError(f"{flag} '{path}' is neither this suite's checkpoint (a dict with 'state_dict' and "
                          "'cfg') nor a YOLOv5 .pt" + (f" (keys {list(ck)[:8]})" if isinstance(ck, dict) else ""))


def build_from_weights(path: str, nc: int | None = None, flag: str = "--weights", cfg=None) -> yolo.Model:
    config, sd = load_weights(path, flag, cfg)
    m = yolo.Model(config)
    m.load_compatible_state_dict(sd, path)
    if nc is not None and nc != m.nc:
        raise CheckpointError(f"{path} predicts {m.nc} classes but the data has nc={nc}")
    return m
