"""YOLOv5 ``Model`` built from a YAML table and the ``Detect`` head, written here.

The tables are data in the published layout (``depth_multiple``, ``width_multiple``, ``anchors``, ``backbone`` and
``head`` rows of ``[from, number, module, args]``), so existing configs work. Each row's module name picks a builder
in ``BUILDERS``; the published scaling rules are facts taken as given: a row's repeat count becomes
``max(round(number x depth_multiple), 1)`` and its output channels ``width_multiple x channels`` rounded up to a
multiple of 8. So are the Detect head's layout (one 1x1 convolution per level predicting ``na x (5 + nc)`` channels,
``anchors`` a buffer in grid units of each level) and the bias prior of its outputs (about 8 objects per 640 x 640
image, class probability about 0.6 / nc).

The split used for QAT: ``Model.forward`` is the traceable network (backbone + neck + the Detect 1x1
convolutions) and returns the raw feature maps, one ``B x na*(5+nc) x H/s x W/s`` tensor per level.
Grid/anchor decoding and NMS live in ``suites.yolov5.postprocess`` and run in float outside the network."""
from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .common import (ACTIVATIONS, C3, SPP, SPPF, Bottleneck, BottleneckCSP, Concat, Conv, Focus,
                     default_activation)

MODELS_DIR = os.path.dirname(os.path.abspath(__file__))
STRIDE_PROBE = 256  # side of the blank image whose output sizes give each level's stride
PREV = -1           # a row's ``from``: the previous row's output


class ConfigError(ValueError):
    pass


class Detect(nn.Module):
    """Per-level 1x1 convolutions predicting ``na * (nc + 5)`` channels (box xywh, objectness, class scores for each
    anchor). ``anchors`` (a buffer, as in the published checkpoints) are in grid units of each level once ``Model``
    has measured the strides; ``stride`` is not saved (it follows from the network)."""

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        per_level = torch.tensor(anchors, dtype=torch.float32)
        self.nc, self.no = nc, nc + 5
        self.nl = per_level.shape[0]
        self.na = per_level.shape[1] // 2
        self.register_buffer("anchors", per_level.view(self.nl, self.na, 2))
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self.m = nn.ModuleList([nn.Conv2d(c, self.na * self.no, 1) for c in ch])

    def forward(self, x):
        return tuple(conv(level) for conv, level in zip(self.m, x))


def make_divisible(x, divisor=8):
    """``x`` rounded up to a multiple of ``divisor``."""
    return int(math.ceil(x / divisor) * divisor)


@dataclass
class _Table:
    """What building one row needs: the multiples and the output channels of the rows before it."""
    depth: float
    width: float
    detect_outputs: int  # na x (5 + nc): a row producing exactly this many channels is not width-scaled
    in_channels: int
    channels: list = field(default_factory=list)

    def channels_of(self, source: int) -> int:
        if source == PREV:
            return self.channels[-1] if self.channels else self.in_channels
        return self.channels[source]

    def width_of(self, channels: int) -> int:
        return channels if channels == self.detect_outputs else make_divisible(channels * self.width, 8)

    def repeats_of(self, number: int) -> int:
        return max(round(number * self.depth), 1)


def _repeated(make, repeats: int) -> nn.Module:
    return nn.Sequential(*(make() for _ in range(repeats))) if repeats > 1 else make()


def _scaled_block(cls, table: _Table, source, repeats: int, args: list):
    """A block whose first argument is its output width; repeated as a Sequential."""
    c_in, c_out = table.channels_of(source), table.width_of(args[0])
    return _repeated(lambda: cls(c_in, c_out, *args[1:]), repeats), c_out


def _scaled_csp(cls, table: _Table, source, repeats: int, args: list):
    """A CSP block: the repeat count goes inside, to its bottleneck stack."""
    c_in, c_out = table.channels_of(source), table.width_of(args[0])
    return cls(c_in, c_out, repeats, *args[1:]), c_out


def _concat(table: _Table, source, repeats: int, args: list):
    return _repeated(lambda: Concat(*args), repeats), sum(table.channels_of(s) for s in source)


def _same_width(cls, table: _Table, source, repeats: int, args: list):
    return _repeated(lambda: cls(*args), repeats), table.channels_of(source)


def _batchnorm(table: _Table, source, repeats: int, args: list):
    c = table.channels_of(source)
    return _repeated(lambda: nn.BatchNorm2d(c), repeats), c


def _detect(table: _Table, source, repeats: int, args: list):
    nc, anchors = args[0], args[1]
    if isinstance(anchors, int):  # only a count: placeholder anchors, the same on every level
        anchors = [list(range(anchors * 2))] * len(source)
    return Detect(nc, anchors, [table.channels_of(s) for s in source]), None


BUILDERS = {
    "Conv": functools.partial(_scaled_block, Conv),
    "Focus": functools.partial(_scaled_block, Focus),
    "Bottleneck": functools.partial(_scaled_block, Bottleneck),
    "SPP": functools.partial(_scaled_block, SPP),
    "SPPF": functools.partial(_scaled_block, SPPF),
    "C3": functools.partial(_scaled_csp, C3),
    "BottleneckCSP": functools.partial(_scaled_csp, BottleneckCSP),
    "Concat": _concat,
    "Detect": _detect,
    "nn.Upsample": functools.partial(_same_width, nn.Upsample),
    "Upsample": functools.partial(_same_width, nn.Upsample),
    "nn.BatchNorm2d": _batchnorm,
}
_LITERALS = {"None": None, "True": True, "False": False}


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


def _argument(value, config: dict):
    """A row argument: ``nc`` / ``anchors`` name the config's values, ``None`` / ``True`` / ``False`` spelled as
    strings (YAML reads them so) are the Python constants."""
    if isinstance(value, str):
        if value in ("nc", "anchors"):
            return config[value]
        return _LITERALS.get(value, value)
    return value


def _absolute(source, row: int):
    """A ``from`` index as a row number (``PREV`` stays: it means the running output)."""
    if isinstance(source, (list, tuple)):
        return [_absolute(s, row) for s in source]
    return source if source == PREV or source >= 0 else row + source


def build_layers(config: dict, in_channels: int = 3):
    """(the rows as an nn.Sequential, each row's absolute ``from``) of a config dict."""
    where = config.get("_path", "config")
    for key in ("nc", "anchors", "backbone", "head"):
        if key not in config:
            raise ConfigError(f"{where}: missing key '{key}'")
    anchors, nc = config["anchors"], int(config["nc"])
    na = len(anchors[0]) // 2 if isinstance(anchors, list) else int(anchors)
    table = _Table(depth=float(config.get("depth_multiple", 1.0)), width=float(config.get("width_multiple", 1.0)),
                   detect_outputs=na * (nc + 5), in_channels=in_channels)
    act = str(config.get("act", "silu")).lower()
    if act not in ACTIVATIONS:
        raise ConfigError(f"{where}: act '{act}' is not an activation (known: {', '.join(ACTIVATIONS)})")
    layers, sources = [], []
    with default_activation(act):
        for row, spec in enumerate(config["backbone"] + config["head"]):
            if not isinstance(spec, (list, tuple)) or len(spec) != 4:
                raise ConfigError(f"{where}: layer {row} is {spec!r}, expected [from, number, module, args]")
            source, number, name, args = spec
            builder = BUILDERS.get(name)
            if builder is None:
                raise ConfigError(f"{where}: layer {row}: unknown module '{name}' "
                                  f"(known: {', '.join(sorted(BUILDERS))})")
            source = _absolute(source, row)
            module, c_out = builder(table, source, table.repeats_of(number), [_argument(a, config) for a in args])
            layers.append(module)
            sources.append(source)
            table.channels.append(c_out)
    return nn.Sequential(*layers), sources


class Model(nn.Module):
    """The network of a config: ``Model("yolov5s")``, ``Model("path.yaml", nc=10)``, ``Model(config_dict)``."""

    def __init__(self, cfg="yolov5s", ch: int = 3, nc: int | None = None):
        super().__init__()
        self.yaml = load_config(cfg)
        if nc is not None:
            self.yaml["nc"] = nc
        self.model, self.sources = build_layers(self.yaml, ch)
        # outputs a later row reads again (besides the running one)
        self.reused = frozenset(s for src in self.sources for s in (src if isinstance(src, list) else [src])
                                if s != PREV)
        self.nc = self.yaml["nc"]
        self.names = [str(i) for i in range(self.nc)]
        det = self.model[-1]
        if not isinstance(det, Detect):
            raise ConfigError("the last layer of a YOLOv5 config must be Detect")
        self.stride = self._measure_strides(ch)
        det.stride.copy_(self.stride)
        det.anchors /= self.stride.view(-1, 1, 1)  # pixels -> grid units of each level
        self._prior_biases()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03

    def forward(self, x):
        reused = {}
        for row, (layer, source) in enumerate(zip(self.model, self.sources)):
            if isinstance(source, list):
                x = [x if s == PREV else reused[s] for s in source]
            elif source != PREV:
                x = reused[source]
            x = layer(x)
            if row in self.reused:
                reused[row] = x
        return x

    def _measure_strides(self, ch: int) -> torch.Tensor:
        """Each level's stride: the probe image's side over that level's output height."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            maps = self.forward(torch.zeros(1, ch, STRIDE_PROBE, STRIDE_PROBE))
        self.train(was_training)
        return torch.tensor([STRIDE_PROBE / m.shape[-2] for m in maps])

    def _prior_biases(self) -> None:
        """Start the objectness and class outputs at their priors instead of 0.5 (published initialisation)."""
        det = self.model[-1]
        class_prior = math.log(0.6 / (det.nc - 0.99)) if det.nc > 1 else 0.0
        with torch.no_grad():
            for conv, stride in zip(det.m, det.stride.tolist()):
                cells = (640 / stride) ** 2
                bias = conv.bias.view(det.na, det.no)
                bias[:, 4] += math.log(8 / cells)
                bias[:, 5:] += class_prior

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
