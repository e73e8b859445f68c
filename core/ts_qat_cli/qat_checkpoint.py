"""Checkpoint tool.

    ts-qat-checkpoint info CKPT
        what a checkpoint holds: kind (QAT / float), epoch and other extras, parameter and quantizer counts
    ts-qat-checkpoint strip CKPT OUT
        drop the 'module.' prefix that DataParallel / DistributedDataParallel add (also inside 'state_dict')
    ts-qat-checkpoint to-float CKPT --arch torchvision:resnet18 [--num-classes N] [--backend NAME]
                                 --out float.pth [--json qparams.json]
        a QAT checkpoint -> the float state_dict (loads into the original architecture) + the parameter JSON,
        without the training script: the model is rebuilt and prepared the way the checkpoint records (backend and
        quantizer configuration; --backend, default TSQAT, for checkpoints without that record), then loaded,
        which checks every quantizer's bits and range against the checkpoint
"""
from __future__ import annotations

import argparse
import sys

import torch

from ts_qat_pytorch.utils.utils import (atomic_torch_save, load_checkpoint, load_qat_checkpoint, save_checkpoint,
                                        strip_module_prefix)


def _state_dict(ckpt):
    return ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt


def info(path: str) -> dict:
    ckpt = load_checkpoint(path)
    sd = _state_dict(ckpt)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    fq = [k for k in sd if "fake_quant" in k]
    out = {
        "kind": "QAT" if fq or (isinstance(ckpt, dict) and ckpt.get("qat")) else "float",
        "tensors": len(tensors),
        "parameters": int(sum(v.numel() for k, v in tensors.items() if "fake_quant" not in k)),
        "quantizer_entries": len(fq),
        "module_prefix": bool(sd) and all(k.startswith("module.") for k in sd),
        "extras": {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler")
                   and isinstance(v, (int, float, str, bool, type(None)))} if isinstance(ckpt, dict) else {},
        "has_optimizer": isinstance(ckpt, dict) and "optimizer" in ckpt,
    }
    record = ckpt.get("quant_scheme") if isinstance(ckpt, dict) else None
    if record:
        kinds = {}
        for q in record["quantizers"].values():
            kinds.setdefault(q["kind"], set()).add(q["bit"])
        out["scheme"] = (f"backend {record.get('backend')}, "
                         + ", ".join(f"{k} bits {sorted(v)}" for k, v in sorted(kinds.items()))
                         + f" (ts_qat_pytorch {record.get('ts_qat_pytorch')})")
    return out


def strip(path: str, out: str) -> None:
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = dict(ckpt, state_dict=strip_module_prefix(ckpt["state_dict"]))
    else:
        ckpt = strip_module_prefix(ckpt)
    atomic_torch_save(ckpt, out)


def build_model(arch: str, num_classes: int | None):
    zoo, _, name = arch.partition(":")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if zoo == "torchvision":
        import torchvision
        return torchvision.models.get_model(name, **kw)
    if zoo == "timm":
        import timm
        return timm.create_model(name, **kw)
    raise SystemExit(f"--arch must be 'torchvision:NAME' or 'timm:NAME', got {arch!r}")


def to_float(path: str, arch: str, num_classes: int | None, backend: str | None, out: str, json_path: str | None):
    from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
    ckpt = load_checkpoint(path)
    record = (ckpt.get("quant_scheme") if isinstance(ckpt, dict) else None) or {}
    del ckpt
    backend = backend or record.get("backend") or "TSQAT"
    model = prepare_by_platform(build_model(arch, num_classes), backend, record.get("prepare_config"))
    load_qat_checkpoint(path, model)  # refuses a model whose quantizers differ from the checkpoint's
    save_checkpoint(model, out, json_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info")
    p.add_argument("ckpt")
    p = sub.add_parser("strip")
    p.add_argument("ckpt")
    p.add_argument("out")
    p = sub.add_parser("to-float")
    p.add_argument("ckpt")
    p.add_argument("--arch", required=True, help="torchvision:NAME or timm:NAME")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--backend", help="the backend to prepare with (default: the checkpoint's, else TSQAT)")
    p.add_argument("--out", required=True)
    p.add_argument("--json")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "info":
            for k, v in info(a.ckpt).items():
                print(f"{k:18s} {v}")
        elif a.cmd == "strip":
            strip(a.ckpt, a.out)
            print(f"wrote {a.out}")
        else:
            to_float(a.ckpt, a.arch, a.num_classes, a.backend, a.out, a.json)
            print(f"wrote {a.out}" + (f" and {a.json}" if a.json else ""))
    except ImportError as e:  # --arch's model zoo
        print(f"error: {e} (--arch torchvision:NAME needs torchvision, timm:NAME timm)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
