"""QConfig: which fake quantizer, observer and scheme weights and activations get.

Built from the ancestor's ``extra_qconfig_dict`` keys laid over a backend's defaults:
``w_observer``, ``a_observer``, ``w_fakequantize``, ``a_fakequantize`` (registered names, classes, or dotted
import paths such as ``"my_pkg.quant.MyFakeQuantize"``),
``w_qscheme``, ``a_qscheme`` (dicts of bit, symmetry, per_channel, pot_scale), and
``w_fakeq_params``, ``a_fakeq_params``, ``w_observer_params``, ``a_observer_params`` (keyword args).
"""
from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..fake_quantize import FAKE_QUANTIZERS, QuantizeBase
from ..observer import OBSERVERS
from ..scheme import QuantScheme

QCONFIG_KEYS = ("w_observer", "a_observer", "w_fakequantize", "a_fakequantize", "w_qscheme", "a_qscheme",
                "w_fakeq_params", "a_fakeq_params", "w_observer_params", "a_observer_params")


def resolve_dotted(obj):
    """``"package.module.Name"`` -> the object it names; anything else is returned as it is."""
    if not isinstance(obj, str) or "." not in obj:
        return obj
    mod, _, attr = obj.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {obj!r} ({type(exc).__name__}: {exc}): give a class, or its full "
                         "import path 'package.module.Name'") from None


def dotted_name(obj) -> str | None:
    """The import path that :func:`resolve_dotted` turns back into ``obj``, or None (a local class, a lambda)."""
    name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    try:
        return name if resolve_dotted(name) is obj else None
    except ValueError:
        return None


def _resolve(value, table: Mapping[str, type], what: str) -> type:
    if isinstance(value, type):
        return value
    if value in table:
        return table[value]
    if isinstance(value, str) and "." in value:
        return resolve_dotted(value)
    close = difflib.get_close_matches(str(value), list(table), n=3)
    raise ValueError(f"unknown {what} {value!r}; valid: {sorted(table)}" + (f" (did you mean {close}?)" if close else ""))


@dataclass
class QConfig:
    w_scheme: QuantScheme
    a_scheme: QuantScheme
    w_fakequantize: type
    a_fakequantize: type
    w_observer: type
    a_observer: type
    w_fakeq_params: dict = field(default_factory=dict)
    a_fakeq_params: dict = field(default_factory=dict)
    w_observer_params: dict = field(default_factory=dict)
    a_observer_params: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, backend_defaults: Mapping[str, Any], extra: Mapping[str, Any] | None) -> "QConfig":
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(QCONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown extra_qconfig_dict keys {unknown}; valid keys: {list(QCONFIG_KEYS)}")
        d = {**backend_defaults, **{k: v for k, v in extra.items() if k not in ("w_qscheme", "a_qscheme")}}
        w_scheme = QuantScheme.from_dict(extra.get("w_qscheme"), QuantScheme.from_dict(backend_defaults["w_qscheme"]))
        a_scheme = QuantScheme.from_dict(extra.get("a_qscheme"), QuantScheme.from_dict(backend_defaults["a_qscheme"]))
        return cls(
            w_scheme=w_scheme, a_scheme=a_scheme,
            w_fakequantize=_resolve(d["w_fakequantize"], FAKE_QUANTIZERS, "fake quantizer"),
            a_fakequantize=_resolve(d["a_fakequantize"], FAKE_QUANTIZERS, "fake quantizer"),
            w_observer=_resolve(d["w_observer"], OBSERVERS, "observer"),
            a_observer=_resolve(d["a_observer"], OBSERVERS, "observer"),
            w_fakeq_params=dict(d.get("w_fakeq_params") or {}), a_fakeq_params=dict(d.get("a_fakeq_params") or {}),
            w_observer_params=dict(d.get("w_observer_params") or {}),
            a_observer_params=dict(d.get("a_observer_params") or {}))

    def check_bits(self, allowed: range, wide_activations: tuple[int, ...] = ()) -> None:
        """Refuse widths outside ``allowed``; activations may also take the ``wide_activations`` widths."""
        wide = tuple(wide_activations)
        for what, s, extra in (("w_qscheme", self.w_scheme, ()), ("a_qscheme", self.a_scheme, wide)):
            if s.bit in allowed or s.bit in extra:
                continue
            msg = f"{what} bit={s.bit} is not supported by this backend; allowed: {allowed.start}..{allowed.stop - 1}"
            if wide and what == "a_qscheme":
                msg += f", or {' / '.join(map(str, wide))} for activations (exported at opset_version=21)"
            elif s.bit in wide:
                msg += f" ({s.bit} bits are for activations only: set it in a_qscheme)"
            raise ValueError(msg)

    @staticmethod
    def _build(fq_cls, scheme, obs_cls, obs_params, fq_params, channels) -> QuantizeBase:
        observer = functools.partial(obs_cls, **obs_params) if obs_params else obs_cls
        kwargs = dict(fq_params)
        if "channels" in inspect.signature(fq_cls.__init__).parameters:
            kwargs["channels"] = channels
        return fq_cls(scheme, observer=observer, **kwargs)

    def weight(self, channels: int = 1, ch_axis: int = 0) -> QuantizeBase:
        """A weight fake quantizer for a tensor with ``channels`` slices along ``ch_axis``."""
        scheme = replace(self.w_scheme, ch_axis=ch_axis)
        fq = self._build(self.w_fakequantize, scheme, self.w_observer, self.w_observer_params,
                         self.w_fakeq_params, channels)
        fq.is_weight = True
        return fq

    def activation(self) -> QuantizeBase:
        return self._build(self.a_fakequantize, self.a_scheme, self.a_observer, self.a_observer_params,
                           self.a_fakeq_params, 1)
