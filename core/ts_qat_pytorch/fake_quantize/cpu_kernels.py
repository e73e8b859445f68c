"""Fused CPU kernels for the default fake quantizers (fixed and LSQ / LSQ+, per tensor and per channel).

torch's CPU fake-quant kernels are scalar loops: forward and backward of one 3.2 M-element activation cost
4-5x a ReLU (shared/FACTS.md), and that, not the convolutions, made a QAT step cost twice a float one.
These kernels compute exactly torch's numbers with the fewest passes the maths allows:

    forward    read x, write y                                   (one pass, vectorised, all threads)
    backward   read x and dy, write dx, and sum the scale and zero-point gradients in the same pass

Nothing else is kept for the backward: x itself, which torch's learnable kernels keep too (no mask, no
intermediate tensors). The sums are per-thread partials in float64 added in thread order, so a step is
deterministic for a given thread count. The BN-folding QAT layers' weight fold and, while training with batch
statistics, their output rescale + BatchNorm + ReLU(6) (``folded_batch_norm``) have kernels here too.

The C source, ``cpu_kernels.c`` beside this file, is compiled once per machine with the system C compiler (about
a second) into the cache folder ($TS_QAT_CACHE, else ~/.cache/ts_qat_pytorch) and called through ctypes, which
releases the GIL. Where no compiler is found, or for CUDA, half precision, non-dense tensors, or under
torch.compile, the quantizers use torch's own kernels (the reference the tests compare against).
``TS_QAT_FAST_FQ=0`` turns the kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref

import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "divide_channels", "fake_quant_fixed", "fake_quant_learnable", "folded_batch_norm",
           "multiply_channels", "usable_for"]

# The kernels' C source (semantics: torch's CPU kernels, stated at its top), shipped beside this module as
# package data and read when the library is built.
_SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.c")

# -ffp-contract=off: no fused multiply-adds, so every product and sum rounds as in torch's kernels.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp",
          "-shared", "-fPIC"]

_lib = None
_lib_error: str | None = None
_lock = threading.Lock()


def _cache_dir() -> str:
    base = os.environ.get("TS_QAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ts_qat_pytorch")
    return os.path.join(base, "kernels")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    try:
        with open(_SOURCE_PATH) as f:
            source = f.read()
    except OSError as exc:
        raise RuntimeError(f"the kernels' C source is missing ({exc}): the installation is incomplete; reinstall "
                           "ts-qat-pytorch") from None
    key = hashlib.sha256("\0".join([source, *_FLAGS, platform.machine(), _cpu_id(), cc]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    so = os.path.join(folder, f"fake_quant_{key}.so")
    if not os.path.exists(so):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = os.path.join(tmp, "fake_quant.c")  # the text hashed above, even if the package file changes now
            with open(src, "w") as f:
                f.write(source)
            out = os.path.join(tmp, "fake_quant.so")
            r = subprocess.run([cc, *_FLAGS, src, "-o", out], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {r.stderr.strip()[:500]}")
            os.replace(out, so)  # atomic: concurrent builders (pytest workers, DDP ranks) never see a torn file
    lib = ctypes.CDLL(so)
    f, i64, fp, dp, i32 = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
    lib.tsq_forward.argtypes = [fp, fp, i64, i64, i64, fp, fp, f, f, i32]
    lib.tsq_forward_flat.argtypes = [fp, fp, i64, f, f, f, f, i32]
    lib.tsq_backward_input.argtypes = [fp, fp, fp, i64, f, f, f, f, i32]
    lib.tsq_backward_learnable_flat.argtypes = [fp, fp, fp, i64, f, f, f, f, i32, dp, dp]
    lib.tsq_backward_learnable_rows.argtypes = [fp, fp, fp, i64, i64, i64, fp, fp, f, f, i32, ctypes.c_double, fp, fp]
    lib.tsq_backward_input_rows.argtypes = [fp, fp, fp, i64, i64, i64, fp, fp, f, f, i32]
    lib.tsq_channel_scale_backward.argtypes = [fp, fp, fp, i64, i64, i64, fp, i32, i32, fp]
    lib.tsq_bn_fold_forward.argtypes = [fp, fp, i64, i64, i64, fp, fp, fp, fp, f, f, fp, fp, i32, f, f, i32, fp, fp]
    lib.tsq_bn_fold_backward.argtypes = [fp, fp, fp, fp, i64, i64, i64, fp, fp, fp, fp, f, f, f, i32, fp, fp, fp]
    for fn in (lib.tsq_bn_fold_forward, lib.tsq_bn_fold_backward, lib.tsq_channel_scale_backward, lib.tsq_forward, lib.tsq_forward_flat, lib.tsq_backward_input, lib.tsq_backward_learnable_flat,
               lib.tsq_backward_learnable_rows, lib.tsq_backward_input_rows):
        fn.restype = None
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _build()
            except Exception as exc:  # no compiler, read-only cache, exotic platform: torch's kernels still work
                _lib_error = str(exc)
                logger.warning("fused fake-quant CPU kernels unavailable (%s); using torch's kernels, which make a "
                               "QAT step about twice as slow on the CPU. Install a C compiler (gcc) to enable "
                               "them.", _lib_error)
    return _lib


def available() -> bool:
    """True when the fused kernels can run here (compiled, or compilable, and not turned off)."""
    if os.environ.get("TS_QAT_FAST_FQ", "1") == "0":
        return False
    return _library() is not None


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def usable_for(x: torch.Tensor, per_channel: bool) -> bool:
    """Whether the fused path handles this input (otherwise the caller uses torch's kernels)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0:
        return False
    if torch.compiler.is_compiling():
        return False  # an opaque ctypes call would break the compiled graph
    if not (x.is_contiguous() if per_channel else _dense(x)):
        return False
    return available()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _rows(x: torch.Tensor, axis: int) -> tuple[int, int, int]:
    c = x.shape[axis]
    inner = 1
    for d in x.shape[axis + 1:]:
        inner *= d
    return x.numel() // (c * inner), c, inner


_rounded_zero_points: dict = {}


def _qparams(scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int):
    """Per-channel scale and zero point as torch's learnable kernels use them, float32 and contiguous: the zero
    point rounded half to even and clamped. The rounded zero point is reused while the tensor is unchanged (an
    LSQ zero point never moves after calibration): a step makes fewer small tensor ops."""
    s = scale.detach().reshape(-1)
    s = s if s.dtype == torch.float32 and s.is_contiguous() else s.float().contiguous()
    hit = _rounded_zero_points.get(id(zero_point))
    # the same live tensor object, unmodified since (a weak reference: a freed tensor's id can be reused)
    if hit is not None and hit[0]() is zero_point and hit[1] == (zero_point._version, qmin, qmax):
        return s, hit[2]
    z = torch.clamp(torch.round(zero_point.detach().reshape(-1).float()), qmin, qmax).contiguous()
    if len(_rounded_zero_points) > 4096:
        _rounded_zero_points.clear()
    _rounded_zero_points[id(zero_point)] = (weakref.ref(zero_point), (zero_point._version, qmin, qmax), z)
    return s, z


def _forward(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    lib = _library()
    y = torch.empty_like(x)  # keeps channels_last
    if axis < 0:
        lib.tsq_forward_flat(_ptr(x), _ptr(y), x.numel(), float(s[0]), float(z[0]), float(qmin), float(qmax),
                             _threads())
    else:
        outer, c, inner = _rows(x, axis)
        lib.tsq_forward(_ptr(x), _ptr(y), outer, c, inner, _ptr(s), _ptr(z), float(qmin), float(qmax), _threads())
    return y


class _FixedFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, qmin, qmax):
        s = scale.detach().reshape(-1).float().contiguous()
        z = zero_point.detach().reshape(-1).float().contiguous()
        ctx.save_for_backward(x)
        ctx.qp = (s, z, axis, qmin, qmax)
        return _forward(x, s, z, axis, qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s, z, axis, qmin, qmax = ctx.qp
        if torch.is_grad_enabled():  # create_graph (Hessian-vector products): the same maths in differentiable ops
            q = _view(z, x, axis) + torch.round(x.detach() * (1.0 / _view(s, x, axis)))
            return g * ((q >= qmin) & (q <= qmax)), None, None, None, None, None
        g = g.contiguous() if axis >= 0 else _match_layout(g, x)
        dx = torch.empty_like(x)
        lib = _library()
        if axis < 0:
            lib.tsq_backward_input(_ptr(x), _ptr(g), _ptr(dx), x.numel(), float(s[0]), float(z[0]), float(qmin),
                                   float(qmax), _threads())
        else:
            outer, c, inner = _rows(x, axis)
            lib.tsq_backward_input_rows(_ptr(x), _ptr(g), _ptr(dx), outer, c, inner, _ptr(s), _ptr(z),
                                        float(qmin), float(qmax), _threads())
        return dx, None, None, None, None, None


def _view(v, x: torch.Tensor, axis: int) -> torch.Tensor | float:
    """A per-channel value shaped to broadcast against x (a plain float per tensor)."""
    if axis < 0:
        return float(v) if isinstance(v, torch.Tensor) else v
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def _learnable_backward_eager(x, g, s, z, axis, qmin, qmax, grad_factor, s_shape, z_shape):
    """The kernels' backward in torch ops, differentiable in g (and so in everything before it): the path for
    ``backward(create_graph=True)``, which second-order methods (Hessian traces) use."""
    sv, zv = _view(s, x, axis), _view(z, x, axis)
    inv = 1.0 / sv
    q = torch.round(zv + x * inv)
    inside = (q >= qmin) & (q <= qmax)
    term = torch.where(inside, ((q.clamp(qmin, qmax) - zv) * sv - x) * inv,
                       torch.where(q < qmin, qmin - zv, qmax - zv))
    dims = [d for d in range(x.dim()) if d != axis] if axis >= 0 else list(range(x.dim()))
    dscale = (g * term).sum(dims) * grad_factor
    dzero = -(g * ~inside).sum(dims) * sv * grad_factor if axis < 0 else -(g * ~inside).sum(dims) * s * grad_factor
    return g * inside, dscale.reshape(s_shape), dzero.reshape(z_shape)


class _LearnableFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, qmin, qmax, grad_factor):
        ctx.save_for_backward(x)
        ctx.shapes = (scale.shape, zero_point.shape)
        lib = _library()
        y = torch.empty_like(x)  # keeps channels_last
        if axis < 0:  # plain floats: no small-tensor ops on the per-step path
            s, zp = float(scale), float(zero_point)
            z_fwd = float(min(max(round(zp), qmin), qmax))  # round(): half to even, like torch.round
            ctx.qp = (axis, qmin, qmax, grad_factor, s, float(int(min(max(zp + 0.5, qmin), qmax))))
            lib.tsq_forward_flat(_ptr(x), _ptr(y), x.numel(), s, z_fwd, float(qmin), float(qmax), _threads())
        else:
            s, z = _qparams(scale, zero_point, axis, qmin, qmax)  # per channel, torch rounds both ways alike
            ctx.qp = (axis, qmin, qmax, grad_factor, s, z)
            outer, c, inner = _rows(x, axis)
            lib.tsq_forward(_ptr(x), _ptr(y), outer, c, inner, _ptr(s), _ptr(z), float(qmin), float(qmax), _threads())
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        axis, qmin, qmax, grad_factor, s, z = ctx.qp
        s_shape, z_shape = ctx.shapes
        if torch.is_grad_enabled():  # create_graph (Hessian-vector products): the same maths in differentiable ops
            return (*_learnable_backward_eager(x.detach(), g, s, z, axis, qmin, qmax, grad_factor, s_shape, z_shape),
                    None, None, None, None)
        g = g.contiguous() if axis >= 0 else _match_layout(g, x)
        dx = torch.empty_like(x)
        lib = _library()
        if axis < 0:
            ds, dz = ctypes.c_double(), ctypes.c_double()
            lib.tsq_backward_learnable_flat(_ptr(x), _ptr(g), _ptr(dx), x.numel(), s, z, float(qmin), float(qmax),
                                            _threads(), ctypes.addressof(ds), ctypes.addressof(dz))
            dscale = torch.full(s_shape, ds.value * grad_factor, dtype=torch.float32)
            dzero = torch.full(z_shape, dz.value * grad_factor, dtype=torch.float32)
        else:
            outer, c, inner = _rows(x, axis)
            dscale = torch.empty(s_shape, dtype=torch.float32)
            dzero = torch.empty(z_shape, dtype=torch.float32)
            lib.tsq_backward_learnable_rows(_ptr(x), _ptr(g), _ptr(dx), outer, c, inner, _ptr(s), _ptr(z),
                                            float(qmin), float(qmax), _threads(), float(grad_factor), _ptr(dscale),
                                            _ptr(dzero))
        return dx, dscale, dzero, None, None, None, None


def _channel_view(s: torch.Tensor, dim: int, axis: int) -> torch.Tensor:
    shape = [1] * dim
    shape[axis] = -1
    return s.reshape(shape)


class _ChannelScale(torch.autograd.Function):
    """out = y / s or y * s along one axis; forward is torch's, backward one fused pass."""

    @staticmethod
    def forward(ctx, y, s, axis, divide):
        sv = _channel_view(s, y.dim(), axis)
        out = y / sv if divide else y * sv
        ctx.save_for_backward(out if divide else y, s)
        ctx.axis, ctx.divide = axis, divide
        return out

    @staticmethod
    def backward(ctx, g):
        t, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable ops on the saved tensors
            sv = _channel_view(s, t.dim(), ctx.axis)
            dims = [d for d in range(t.dim()) if d != ctx.axis]
            if ctx.divide:
                return g / sv, -(g * t).sum(dims) / s, None, None
            return g * sv, (g * t).sum(dims), None, None
        g = g.contiguous()
        gy = torch.empty_like(t)
        outer, c, inner = _rows(t, ctx.axis)
        sf = s.detach().contiguous()  # float32: checked before the fused path is taken
        ds = torch.empty(c, dtype=torch.float32)
        _library().tsq_channel_scale_backward(_ptr(g), _ptr(t), _ptr(gy), outer, c, inner, _ptr(sf), int(ctx.divide),
                                              _threads(), _ptr(ds))
        return gy, ds, None, None


def _channel_scale(y: torch.Tensor, s: torch.Tensor, axis: int, divide: bool) -> torch.Tensor:
    if (y.dim() > axis and y.is_contiguous() and s.dim() == 1 and s.dtype == torch.float32 and s.device == y.device
            and s.numel() == y.shape[axis] and usable_for(y, per_channel=True)):
        return _ChannelScale.apply(y, s, axis, divide)
    sv = _channel_view(s, y.dim(), axis)
    return y / sv if divide else y * sv


def divide_channels(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y / s`` with ``s`` one value per channel (dim 1), as the BN-folding QAT layers rescale their output.

    The forward is torch's division; the backward reads the gradient and the output once (eager autograd makes
    five passes and keeps y as well)."""
    return _channel_scale(y, s, 1, divide=True)


def multiply_channels(w: torch.Tensor, s: torch.Tensor, axis: int) -> torch.Tensor:
    """``w * s`` with ``s`` one value per slice along ``axis``, as the BN-folding QAT layers scale their weight.

    The forward is torch's product; the backward is one pass (eager: a product, another product, a sum)."""
    return _channel_scale(w, s, axis, divide=False)


_BN_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _act_bounds(act) -> tuple[float, float] | None:
    """(lo, hi) of an activation that is a clamp (ReLU, ReLU6, Hardtanh), which the BN kernel applies itself;
    None for no activation; False for another one (applied after, by the layer)."""
    if act is None:
        return None
    if type(act) is torch.nn.ReLU:
        return 0.0, float("inf")
    if type(act) in (torch.nn.ReLU6, torch.nn.Hardtanh):
        return float(act.min_val), float(act.max_val)
    return False


def _f32(t):
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


class _FoldedBatchNorm(torch.autograd.Function):
    """``act(bn(y / s + b))`` with batch statistics, in two kernel calls (see ``folded_batch_norm``)."""

    @staticmethod
    def forward(ctx, y, s, bias, gamma, beta, bn, act, bounds, eaf):
        outer, c, inner = _rows(y, 1)
        out = torch.empty_like(y)
        mean, invstd = torch.empty(c), torch.empty(c)
        sd = s.detach()
        track = bn.running_mean is not None
        lo, hi = bounds if bounds else (0.0, 0.0)
        _library().tsq_bn_fold_forward(
            _ptr(y), _ptr(out), outer, c, inner, _ptr(sd), _ptr(bias) if bias is not None else None,
            _ptr(gamma) if gamma is not None else None, _ptr(beta) if beta is not None else None, float(bn.eps),
            float(eaf), _ptr(bn.running_mean) if track else None, _ptr(bn.running_var) if track else None,
            int(bool(bounds)), lo, hi, _threads(), _ptr(mean), _ptr(invstd))
        ctx.save_for_backward(y, s, bias, gamma, beta, out if bounds else None)
        ctx.stats = (mean, invstd, float(bn.eps), act, bounds)
        return out

    @staticmethod
    def backward(ctx, g):
        y, s, bias, gamma, beta, out = ctx.saved_tensors
        mean, invstd, eps, act, bounds = ctx.stats
        if torch.is_grad_enabled():  # create_graph (Hessian-vector products): the same maths in differentiable ops
            return _folded_batch_norm_backward_eager(g, y, s, bias, gamma, beta, eps, act, ctx.needs_input_grad)
        g = g.contiguous()
        outer, c, inner = _rows(y, 1)
        dy = torch.empty_like(y)
        dgamma, dbeta, ds = torch.empty(c), torch.empty(c), torch.empty(c)
        lo, hi = bounds if bounds else (0.0, 0.0)
        _library().tsq_bn_fold_backward(
            _ptr(g), _ptr(y), _ptr(out) if out is not None else None, _ptr(dy), outer, c, inner, _ptr(s.detach()),
            _ptr(mean), _ptr(invstd), _ptr(gamma.detach()) if gamma is not None else None, eps, lo, hi, _threads(),
            _ptr(dgamma), _ptr(dbeta), _ptr(ds))
        need = ctx.needs_input_grad
        return (dy if need[0] else None, ds.reshape(s.shape) if need[1] else None,
                torch.zeros_like(bias) if need[2] else None,  # a shift before batch statistics: no gradient
                dgamma if need[3] else None, dbeta if need[4] else None, None, None, None, None)


def _reference_folded_batch_norm(y, s, bias, gamma, beta, eps, act):
    """The eager maths of ``folded_batch_norm`` (batch statistics, no running-statistics update)."""
    t = y / _channel_view(s, y.dim(), 1)
    if bias is not None:
        t = t + _channel_view(bias, y.dim(), 1)
    out = torch.nn.functional.batch_norm(t, None, None, gamma, beta, True, 0.0, eps)
    return act(out) if act is not None else out


def _folded_batch_norm_backward_eager(g, y, s, bias, gamma, beta, eps, act, need):
    with torch.enable_grad():
        out = _reference_folded_batch_norm(y, s, bias, gamma, beta, eps, act)
        inputs = [t for t, n in zip((y, s, bias, gamma, beta), need) if n]
        grads = iter(torch.autograd.grad(out, inputs, g, create_graph=True, allow_unused=True))
    return (*[next(grads) if n else None for n in need[:5]], None, None, None, None)


def folded_batch_norm(y: torch.Tensor, s: torch.Tensor, bias, bn, act) -> tuple[torch.Tensor, bool] | None:
    """The training forward of a BN-folding QAT layer after its convolution: ``act(bn(y / s + bias))`` with the
    batch's statistics, as (output, whether ``act`` was applied), or None where the fused path does not apply
    (then the caller runs the eager ops).

    BatchNorm normalises each channel, so ``bn(y / s + bias)`` is ``(y - mean_y) / sqrt(var_y + eps * s^2) *
    gamma + beta``: one kernel reads y twice for the statistics and writes the output once, applying a ReLU /
    ReLU6 / Hardtanh activation in the same pass; the backward is two passes (sums, then the input gradient) and
    gives the gamma, beta and s gradients from the same sums. Eager ops make a dozen passes over the activation
    for the same result (the rescale, BatchNorm and the activation, forward and backward). Same maths as the
    eager ops: outputs and gradients agree to float32 rounding (the statistics are summed in float64). The
    running statistics move as ``bn``'s would (momentum, or the cumulative average with ``momentum=None``)."""
    if type(bn) not in _BN_TYPES or not bn.training or not bn.track_running_stats or bn.running_mean is None:
        return None
    if y.dim() < 2 or y.numel() <= y.shape[1] or not usable_for(y, per_channel=True):
        return None  # one value per channel: BatchNorm's own error says so
    gamma, beta = (bn.weight, bn.bias) if bn.affine else (None, None)
    if not all(_f32(t) for t in (s, bias, gamma, beta, bn.running_mean, bn.running_var)) or s.dim() != 1:
        return None
    bounds = _act_bounds(act)
    applied = bounds is not False  # no activation, or one the kernel applies
    bounds = bounds or None
    eaf = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:  # as nn.BatchNorm's forward
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            eaf = 1.0 / float(bn.num_batches_tracked)
    out = _FoldedBatchNorm.apply(y, s, bias, gamma, beta, bn, act if applied else None, bounds, eaf)
    return out, applied


def _match_layout(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient in x's memory layout, so that flat kernels pair element i of both."""
    if x.is_contiguous():
        return g.contiguous()
    return g.contiguous(memory_format=torch.channels_last)


def fake_quant_fixed(x, scale, zero_point, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    """``torch.fake_quantize_per_{tensor,channel}_affine`` (axis < 0: per tensor), fused."""
    return _FixedFakeQuant.apply(x, scale, zero_point, axis, qmin, qmax)


def fake_quant_learnable(x, scale, zero_point, axis: int, qmin: int, qmax: int, grad_factor: float) -> torch.Tensor:
    """``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (axis < 0: per tensor), fused."""
    return _LearnableFakeQuant.apply(x, scale, zero_point, axis, qmin, qmax, grad_factor)
