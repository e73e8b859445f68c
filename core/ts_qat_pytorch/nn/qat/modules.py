"""QAT versions of the float layers: the same layer, its weight passed through a fake quantizer.

Each keeps the float layer's parameter names (``weight``, ``bias``), so the float state_dict maps
back one to one, and gives back a float layer with :meth:`to_float`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...fake_quantize import QuantizeBase

WeightQuantizer = Callable[..., QuantizeBase]


def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    # Share the Parameter objects, so an optimizer built on the float model keeps working.
    dst.weight = src.weight
    if getattr(src, "bias", None) is not None:
        dst.bias = src.bias
    dst.train(src.training)
    dst.to(src.weight.device)


class QATMixin:
    """``from_float`` / ``to_float`` for layers whose constructor args live in ``_FLOAT_ARGS``."""

    _FLOAT_MODULE: type[nn.Module]
    _FLOAT_ARGS: tuple[str, ...]
    weight_ch_axis = 0

    @classmethod
    def float_kwargs(cls, mod: nn.Module) -> dict:
        kw = {a: getattr(mod, a) for a in cls._FLOAT_ARGS}
        if "bias" in kw:
            kw["bias"] = mod.bias is not None
        return kw

    @classmethod
    def from_float(cls, mod: nn.Module, weight_fake_quant: WeightQuantizer):
        qmod = cls(**cls.float_kwargs(mod), weight_fake_quant=weight_fake_quant)
        _copy_params(qmod, mod)
        return qmod

    def to_float(self) -> nn.Module:
        fmod = self._FLOAT_MODULE(**self.float_kwargs(self))
        _copy_params(fmod, self)
        return fmod

    def quantized_weight_source(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) as deployed, before weight quantization (BN folded where there is one)."""
        return self.weight, getattr(self, "bias", None)

    @property
    def input_fake_quant(self) -> QuantizeBase | None:
        """The quantizer of this layer's input, whose scale puts the bias on the deployed int32 grid
        (:func:`deployed_bias`); None before prepare, for an unquantized input, and after export's freeze.

        The quantizer is a submodule of the prepared model, called in the graph just before this layer, and is
        registered there only: the layer holds a link, so ``named_modules`` and ``state_dict`` list it once, under
        its own name. ``repr`` shows the link by that name."""
        return self.__dict__.get("_input_fake_quant")

    def link_input_quantizer(self, fq: QuantizeBase | None) -> None:
        """Set (or, with None, drop) :attr:`input_fake_quant`, without registering ``fq`` as a submodule."""
        object.__setattr__(self, "_input_fake_quant", fq)  # nn.Module.__setattr__ would register it a second time

    def extra_repr(self) -> str:
        fq = self.input_fake_quant
        link = "" if fq is None else f", input_fake_quant={fq.qualname or type(fq).__name__}"
        return super().extra_repr() + link


def deployed_bias(layer: nn.Module, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as an integer kernel adds it: int32 on the grid ``input scale x weight scale``.

    onnxruntime's WeightBiasQuantization pass stores every float bias of a QDQ Conv / Gemm that way before
    fusing QLinearConv / QGemm. Left float here, the fake-quant forward and the deployed model disagree by
    up to half an int32 step per output, which flips outputs sitting on a rounding boundary, and a deep
    network amplifies the flips (measured: MiniLM logits 0.47 apart, mobilenet_v2 0.05). Must run after the
    weight quantizer (its scale). Straight-through: the bias gradient is unchanged.
    """
    fq_in = getattr(layer, "input_fake_quant", None)
    wfq = getattr(layer, "weight_fake_quant", None)
    if bias is None or not isinstance(fq_in, QuantizeBase) or not isinstance(wfq, QuantizeBase):
        return bias
    if not (fq_in.fake_quant_enabled and fq_in.initialized and wfq.fake_quant_enabled and wfq.initialized):
        return bias
    s_in, s_w = fq_in.qparams()[0], wfq.qparams()[0]
    if s_in.numel() != 1 or s_w.numel() not in (1, bias.numel()):
        return bias
    scale = (s_in.reshape(()).to(bias.device, torch.float32) * s_w.to(bias.device, torch.float32)).detach()
    q = torch.clamp(torch.round(bias.detach().float() / scale), -(2 ** 31), 2 ** 31 - 1) * scale
    return bias + (q.to(bias.dtype) - bias).detach()


def _make_weight_fq(factory: WeightQuantizer, channels: int, axis: int) -> QuantizeBase:
    return factory(channels=channels, ch_axis=axis)


_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "bias", "padding_mode")


class _QConvNd:
    def _init_wfq(self, weight_fake_quant):
        self.weight_fake_quant = _make_weight_fq(weight_fake_quant, self.weight.shape[self.weight_ch_axis],
                                                 self.weight_ch_axis)

    def forward(self, x):
        w = self.weight_fake_quant(self.weight)
        return self._conv_forward(x, w, deployed_bias(self, self.bias))


class Conv1d(QATMixin, _QConvNd, nn.Conv1d):
    _FLOAT_MODULE, _FLOAT_ARGS = nn.Conv1d, _CONV_ARGS

    def __init__(self, *args, weight_fake_quant, **kwargs):
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._init_wfq(weight_fake_quant)


class Conv2d(QATMixin, _QConvNd, nn.Conv2d):
    _FLOAT_MODULE, _FLOAT_ARGS = nn.Conv2d, _CONV_ARGS

    def __init__(self, *args, weight_fake_quant, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_wfq(weight_fake_quant)


_CONVT_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding",
               "groups", "bias", "dilation", "padding_mode")


class _QConvTransposeNd:
    weight_ch_axis = 1  # ConvTranspose weights are (in, out / groups, k...)

    def _init_wfq(self, weight_fake_quant):
        self.weight_fake_quant = _make_weight_fq(weight_fake_quant, self.weight.shape[1], 1)

    def _transposed(self, x, weight, bias, output_size=None):
        num_spatial = self.weight.dim() - 2
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              num_spatial, self.dilation)
        fn = F.conv_transpose1d if num_spatial == 1 else F.conv_transpose2d
        return fn(x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation)

    def forward(self, x, output_size=None):
        return self._transposed(x, self.weight_fake_quant(self.weight), self.bias, output_size)


class ConvTranspose1d(QATMixin, _QConvTransposeNd, nn.ConvTranspose1d):
    _FLOAT_MODULE, _FLOAT_ARGS = nn.ConvTranspose1d, _CONVT_ARGS
    weight_ch_axis = 1

    def __init__(self, *args, weight_fake_quant, **kwargs):
        nn.ConvTranspose1d.__init__(self, *args, **kwargs)
        self._init_wfq(weight_fake_quant)


class ConvTranspose2d(QATMixin, _QConvTransposeNd, nn.ConvTranspose2d):
    _FLOAT_MODULE, _FLOAT_ARGS = nn.ConvTranspose2d, _CONVT_ARGS
    weight_ch_axis = 1

    def __init__(self, *args, weight_fake_quant, **kwargs):
        nn.ConvTranspose2d.__init__(self, *args, **kwargs)
        self._init_wfq(weight_fake_quant)


class Linear(QATMixin, nn.Linear):
    _FLOAT_MODULE, _FLOAT_ARGS = nn.Linear, ("in_features", "out_features", "bias")

    def __init__(self, *args, weight_fake_quant, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_fake_quant = _make_weight_fq(weight_fake_quant, self.out_features, 0)

    def forward(self, x):
        w = self.weight_fake_quant(self.weight)
        return F.linear(x, w, deployed_bias(self, self.bias))


class Embedding(QATMixin, nn.Embedding):
    """Embedding table quantized per row (one scale per token), gathered as integers."""

    _FLOAT_MODULE = nn.Embedding
    _FLOAT_ARGS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")

    def __init__(self, *args, weight_fake_quant, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_fake_quant = _make_weight_fq(weight_fake_quant, self.num_embeddings, 0)

    def forward(self, x):
        return F.embedding(x, self.weight_fake_quant(self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


QAT_MODULE_MAPPING: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.ConvTranspose1d: ConvTranspose1d,
    nn.ConvTranspose2d: ConvTranspose2d, nn.Linear: Linear, nn.Embedding: Embedding,
}
