"""YOLOv5 ``Model`` built from a YAML config (the published layout: depth_multiple, width_multiple, anchors,
backbone and head lists of ``[from, number, module, args]``) and the ``Detect`` head.

The split used for QAT: ``Model.forward`` is the traceable network (backbone + neck + the Detect 1x1
convolutions) and returns the raw feature maps, one ``B x na*(5+nc) x H/s x W/s`` tensor per level.
Grid/anchor decoding and NMS live in ``suites.yolov5.postprocess`` and run in float outside the network."""
from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn as nn

from . import common
from .common import C3, SPP, SPPF, Bottleneck, BottleneckCSP, Concat, Conv, Focus

MODELS_DIR = os.path.dirname(os.path.abspath(__file__))


class ConfigError(ValueError):
    pass


class Detect(nn.Module):
    """Per-level 1x1 convolutions predicting ``na * (nc + 5)`` channels. ``anchors`` (a buffer, as in the
    published checkpoints) are in grid units of each level: pixels / stride."""

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, x):
        return tuple(self.m[i](x[i]) for i in range(self.nl))


MODULES = {"Conv": Conv, "Focus": Focus, "Bottleneck": Bottleneck, "BottleneckCSP": BottleneckCSP, "C3": C3,
           "SPP": SPP, "SPPF": SPPF, "Concat": Concat, "Detect": Detect, "nn.Upsample": nn.Upsample,
           "Upsample": nn.Upsample, "nn.BatchNorm2d": nn.BatchNorm2d}
_CHANNEL_MODULES = (Conv, Focus, Bottleneck, BottleneckCSP, C3, SPP, SPPF)


def make_divisible(x, divisor=8):
    return int(math.ceil(x / divisor) * divisor)


def load_config(cfg) -> dict:
    """A config dict from a dict, a YAML path, or a bare name found in suites/yolov5/models (``yolov5s``)."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    import yaml
    path = str(cfg)
    if not os.path.exists(path):
        cand = os.path.join(MODELS_DIR, path if path.endswith(".yaml") else path + ".yaml")
        if not os.path.exists(cand):
            known = sorted(f[:-5] for f in os.listdir(MODELS_DIR) if f.endswith(".yaml"))
            raise ConfigError(f"model config '{cfg}' not found (a YAML path or one of: {', '.join(known)})")
        path = cand
    with open(path) as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: not a YAML mapping")
    d.setdefault("_path", path)
    return d


def _resolve_arg(a, d: dict):
    if isinstance(a, str):
        if a in ("nc", "anchors"):
            return d[a]
        if a in ("None", "True", "False"):
            return {"None": None, "True": True, "False": False}[a]
    return a


def parse_model(d: dict, ch: int = 3):
    where = d.get("_path", "config")
    for k in ("nc", "anchors", "backbone", "head"):
        if k not in d:
            raise ConfigError(f"{where}: missing key '{k}'")
    gd, gw = float(d.get("depth_multiple", 1.0)), float(d.get("width_multiple", 1.0))
    anchors, nc = d["anchors"], int(d["nc"])
    na = len(anchors[0]) // 2 if isinstance(anchors, list) else int(anchors)
    no = na * (nc + 5)
    common.set_default_act(str(d.get("act", "silu")).lower())
    layers, save, chs = [], [], []
    try:
        for i, row in enumerate(d["backbone"] + d["head"]):
            if not isinstance(row, (list, tuple)) or len(row) != 4:
                raise ConfigError(f"{where}: layer {i} is {row!r}, expected [from, number, module, args]")
            f, n, name, args = row
            if name not in MODULES:
                raise ConfigError(f"{where}: layer {i}: unknown module '{name}' (known: {', '.join(sorted(MODULES))})")
            m = MODULES[name]
            args = [_resolve_arg(a, d) for a in args]
            n = max(round(n * gd), 1) if n > 1 else n
            prev = lambda x: chs[x] if x != -1 else (chs[-1] if chs else ch)  # noqa: E731
            if m in _CHANNEL_MODULES:
                c1, c2 = prev(f), args[0]
                if c2 != no:
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
                if m in (BottleneckCSP, C3):
                    args.insert(2, n)
                    n = 1
            elif m is nn.BatchNorm2d:
                args, c2 = [prev(f)], prev(f)
            elif m is Concat:
                c2 = sum(prev(x) for x in f)
            elif m is Detect:
                args.append([prev(x) for x in f])
                if isinstance(args[1], int):
                    args[1] = [list(range(args[1] * 2))] * len(f)
                c2 = None
            else:
                c2 = prev(f)
            mod = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
            mod.i, mod.f, mod.type = i, f, name
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(mod)
            chs.append(c2)
    finally:
        common.set_default_act("silu")
    return nn.Sequential(*layers), sorted(set(save))


class Model(nn.Module):
    def __init__(self, cfg="yolov5s", ch: int = 3, nc: int | None = None):
        super().__init__()
        self.yaml = load_config(cfg)
        if nc is not None and nc != self.yaml["nc"]:
            self.yaml["nc"] = nc
        self.model, self.save = parse_model(self.yaml, ch)
        self.nc = self.yaml["nc"]
        self.names = [str(i) for i in range(self.nc)]
        det = self.model[-1]
        if not isinstance(det, Detect):
            raise ConfigError("the last layer of a YOLOv5 config must be Detect")
        s = 256
        with torch.no_grad():
            was = self.training
            self.eval()
            stride = torch.tensor([s / x.shape[-2] for x in self.forward(torch.zeros(1, ch, s, s))])
            self.train(was)
        det.stride.copy_(stride)
        det.anchors /= stride.view(-1, 1, 1)
        self.stride = stride
        self._initialize_biases()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def _initialize_biases(self):
        det = self.model[-1]
        for mi, s in zip(det.m, det.stride):
            b = mi.bias.view(det.na, -1)
            with torch.no_grad():
                b[:, 4] += math.log(8 / (640 / float(s)) ** 2)
                b[:, 5:] += math.log(0.6 / (det.nc - 0.99)) if det.nc > 1 else 0.0

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    def load_compatible_state_dict(self, sd: dict, where: str = "state_dict") -> None:
        """Load a published-layout state_dict (fp16 ok; ``anchor_grid`` dropped); shapes must match."""
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()
              if not k.endswith("anchor_grid")}
        own = self.state_dict()
        bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
               if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if bad or missing or unexpected:
            raise ConfigError(f"{where} does not fit this model config: "
                              + "; ".join(filter(None, [f"shape mismatch {bad[:3]}" if bad else "",
                                                        f"missing {missing[:3]}" if missing else "",
                                                        f"unexpected {unexpected[:3]}" if unexpected else ""])))
        self.load_state_dict(sd)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
