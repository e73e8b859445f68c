"""The fused CPU fake-quant kernels (fake_quantize/cpu_kernels.py) against torch's own kernels, the eager
reference: forward outputs and input gradients identical, scale / zero-point gradients within 1e-6 relative."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from ts_qat_pytorch.fake_quantize import cpu_kernels as K
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.utils.state import enable_calibration, enable_quantization

pytestmark = pytest.mark.skipif(not K.available(), reason="no C compiler: the fused kernels are not built here")


def _sum_bound(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, axis: int) -> torch.Tensor:
    """1e-6 of the sum of |per-element terms| of each scale-gradient sum: the scale against which two correct
    float32 summations in different orders are compared (the sums cancel heavily)."""
    shape = [1] * x.dim()
    if axis >= 0:
        shape[axis] = -1
    sv = s.reshape(shape)
    term = torch.maximum((x / sv).abs(), torch.tensor(float(max(abs(qmin), abs(qmax)))))
    t = (g * term).abs().double()
    dims = [d for d in range(x.dim()) if d != axis] if axis >= 0 else list(range(x.dim()))
    return 1e-6 * t.sum(dims) + 1e-12


CASES = [((4, 16, 9, 9), -1), ((2, 8, 130, 130), -1), ((32, 16, 3, 3), 0), ((4, 16, 9, 9), 1), ((64, 300), 0)]
RANGES = [(-128, 127, 0.0), (0, 255, 3.0), (0, 255, 2.5), (-8, 7, 0.0)]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("qmin,qmax,zp", RANGES)
def test_learnable_matches_torch_kernels(shape, axis, qmin, qmax, zp):
    torch.manual_seed(0)
    x = torch.randn(shape) * 2
    c = shape[axis] if axis >= 0 else 1
    s = torch.rand(c) * 0.02 + 0.01 if qmax > 100 else torch.rand(c) * 0.2 + 0.2
    z = torch.full((c,), zp)
    g = torch.randn(shape)
    leaves = [(x.clone().requires_grad_(), s.clone().requires_grad_(), z.clone().requires_grad_()) for _ in range(2)]
    (xr, sr, zr), (xf, sf, zf) = leaves
    if axis < 0:
        ref = torch._fake_quantize_learnable_per_tensor_affine(xr, sr, zr, qmin, qmax, 0.3)
    else:
        ref = torch._fake_quantize_learnable_per_channel_affine(xr, sr, zr, axis, qmin, qmax, 0.3)
    out = K.fake_quant_learnable(xf, sf, zf, axis, qmin, qmax, 0.3)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(out, ref)
    assert torch.equal(xf.grad, xr.grad)
    bound = _sum_bound(g, x, s, qmin, qmax, axis) * 0.3
    assert ((sf.grad - sr.grad).abs().double() <= bound).all(), (sf.grad - sr.grad).abs().max()
    assert ((zf.grad - zr.grad).abs().double() <= bound).all(), (zf.grad - zr.grad).abs().max()


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("qmin,qmax,zp", [r for r in RANGES if r[2] == int(r[2])])
def test_fixed_matches_torch_kernels(shape, axis, qmin, qmax, zp):
    torch.manual_seed(1)
    x = torch.randn(shape) * 2
    c = shape[axis] if axis >= 0 else 1
    s = torch.rand(c) * 0.02 + 0.01
    z = torch.full((c,), int(zp), dtype=torch.int32)
    g = torch.randn(shape)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    if axis < 0:
        ref = torch.fake_quantize_per_tensor_affine(xr, s, z, qmin, qmax)
    else:
        ref = torch.fake_quantize_per_channel_affine(xr, s, z, axis, qmin, qmax)
    out = K.fake_quant_fixed(xf, s, z, axis, qmin, qmax)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(out, ref)
    assert torch.equal(xf.grad, xr.grad)


def test_channels_last_and_determinism():
    torch.manual_seed(2)
    x = torch.randn(4, 16, 20, 20).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 16, 20, 20)
    grads = []
    for _ in range(2):
        xl, sl = x.clone().requires_grad_(), torch.tensor([0.02], requires_grad=True)
        y = K.fake_quant_learnable(xl, sl, torch.zeros(1), -1, 0, 255, 0.1)
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.backward(g)
        grads.append((y, xl.grad, sl.grad))
    xr, sr = x.contiguous().requires_grad_(), torch.tensor([0.02], requires_grad=True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xr, sr, torch.zeros(1), 0, 255, 0.1)
    ref.backward(g)
    assert torch.equal(grads[0][0], ref) and torch.equal(grads[0][1], xr.grad)
    # a step is deterministic: the same sums in the same order
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))


@pytest.mark.parametrize("shape,axis", [((64, 32, 3, 3), 0), ((32, 1, 3, 3), 0), ((16, 24, 4, 4), 1), ((10, 7), 0)])
def test_multiply_channels_matches_eager_product(shape, axis):
    """The BN-folding weight scale w * s: the same product, gradients of w identical, of s within 1e-6."""
    torch.manual_seed(5)
    w, s, g = torch.randn(shape), torch.rand(shape[axis]) + 0.5, torch.randn(shape)
    view = [1] * len(shape)
    view[axis] = -1
    (wr, sr), (wf, sf) = [(w.clone().requires_grad_(), s.clone().requires_grad_()) for _ in range(2)]
    ref = wr * sr.reshape(view)
    out = K.multiply_channels(wf, sf, axis)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(out, ref) and torch.equal(wf.grad, wr.grad)
    torch.testing.assert_close(sf.grad, sr.grad, rtol=1e-6, atol=1e-6 * sr.grad.abs().max().item())


def test_divide_channels_matches_eager_division():
    torch.manual_seed(3)
    for shape in [(8, 32, 14, 14), (16, 64), (4, 16, 100)]:
        y, s, g = torch.randn(shape), torch.rand(shape[1]) + 0.5, torch.randn(shape)
        (yr, sr), (yf, sf) = [(y.clone().requires_grad_(), s.clone().requires_grad_()) for _ in range(2)]
        ref = yr / sr.reshape([1, -1] + [1] * (len(shape) - 2))
        out = K.divide_channels(yf, sf)
        ref.backward(g)
        out.backward(g)
        assert torch.equal(out, ref) and torch.equal(yf.grad, yr.grad)
        torch.testing.assert_close(sf.grad, sr.grad, rtol=1e-6, atol=1e-6 * sr.grad.abs().max().item())


def _bn(c: int, dim: int, momentum=0.1) -> nn.Module:
    torch.manual_seed(5)
    bn = (nn.BatchNorm1d if dim < 4 else nn.BatchNorm2d)(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_var.fill_(2.0)
    return bn


def _eager_folded(y, s, b, bn, act):
    view = [1, -1] + [1] * (y.dim() - 2)
    t = y / s.reshape(view) + (b.reshape(view) if b is not None else 0)
    out = bn(t)
    return act(out) if act is not None else out


@pytest.mark.parametrize("shape,act,bias,momentum", [
    ((8, 32, 14, 14), nn.ReLU6(), False, 0.1), ((16, 64), None, True, 0.1), ((4, 16, 100), nn.ReLU(), True, None),
    ((2, 8, 5, 5), nn.SiLU(), False, 0.1), ((4, 8, 6, 6), nn.Hardtanh(-1.0, 2.0), True, 0.3)])
def test_folded_batch_norm_matches_the_eager_rescale_and_batch_norm(shape, act, bias, momentum):
    """The BN-folding layers' training rescale + BatchNorm (+ ReLU / ReLU6 / Hardtanh) kernel against the eager
    ops: outputs, input / gamma / beta gradients and the running statistics to float32 rounding; the s gradient
    (a sum that cancels to almost nothing: BatchNorm undoes the scale but for eps) against float64, which the
    kernel's closed form meets where the eager float32 sum does not."""
    torch.manual_seed(0)
    c = shape[1]
    y, s, g = torch.randn(shape) * 3 + 1, torch.rand(c) + 0.5, torch.randn(shape)
    b = torch.randn(c) if bias else None
    runs = {}
    for kind in ("kernel", "eager", "float64"):
        dt = torch.float64 if kind == "float64" else torch.float32
        bn = _bn(c, len(shape), momentum).to(dt)
        yl, sl = y.to(dt).clone().requires_grad_(), s.to(dt).clone().requires_grad_()
        bl = b.to(dt).clone().requires_grad_() if b is not None else None
        for _ in range(2):  # twice: the running statistics' update (and momentum=None's cumulative average)
            if kind == "kernel":
                out, applied = K.folded_batch_norm(yl, sl, bl, bn, act)
                assert applied == (not isinstance(act, nn.SiLU))
                out = out if applied else act(out)
                assert out.grad_fn.name() in ("_FoldedBatchNormBackward", "SiluBackward0")
            else:
                out = _eager_folded(yl, sl, bl, bn, act)
        out.backward(g.to(dt))
        runs[kind] = dict(out=out.detach(), dy=yl.grad, ds=sl.grad, dgamma=bn.weight.grad, dbeta=bn.bias.grad,
                          mean=bn.running_mean, var=bn.running_var, n=bn.num_batches_tracked)
    k, e, d = runs["kernel"], runs["eager"], runs["float64"]
    assert k["n"] == e["n"] == 2
    for name in ("out", "dy", "dgamma", "dbeta", "mean", "var"):
        torch.testing.assert_close(k[name], e[name], rtol=1e-5, atol=1e-5 * e[name].abs().max().item(), msg=name)
    err_k, err_e = (k["ds"].double() - d["ds"]).abs().max(), (e["ds"].double() - d["ds"]).abs().max()
    assert err_k <= 1e-4 * d["ds"].abs().max() and err_k <= err_e, (err_k, err_e)


def test_folded_batch_norm_second_order_and_where_it_steps_aside():
    """create_graph (Hessian-vector products) runs the eager maths; a BatchNorm in eval mode (a user freezing it
    with bn.eval()), one value per channel and torch's kernels switched off all take the eager ops."""
    torch.manual_seed(1)
    y, s = torch.randn(4, 8, 5, 5, requires_grad=True), torch.rand(8) + 0.5
    hv = []
    for fused in (True, False):
        bn = _bn(8, 4)
        out = K.folded_batch_norm(y, s, None, bn, nn.ReLU6())[0] if fused else _eager_folded(y, s, None, bn,
                                                                                             nn.ReLU6())
        (gy,) = torch.autograd.grad((out ** 3).sum(), y, create_graph=True)
        (h,) = torch.autograd.grad(gy.square().sum(), y)
        hv.append(h)
    torch.testing.assert_close(hv[0], hv[1], rtol=1e-4, atol=1e-4 * hv[1].abs().max().item())
    bn = _bn(8, 4).eval()
    assert K.folded_batch_norm(y, s, None, bn, None) is None
    assert K.folded_batch_norm(torch.randn(1, 8), s, None, _bn(8, 2), None) is None


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.conv2(x)
        return self.fc(x.mean((2, 3)))


def _prepared(backend_cfg=None):
    torch.manual_seed(4)
    q = prepare_by_platform(_Net(), BackendType.TSQAT, backend_cfg)
    q.eval()
    enable_calibration(q)
    with torch.no_grad():
        q(torch.randn(8, 3, 16, 16))
    enable_quantization(q)
    q.train()
    return q


@pytest.mark.parametrize("fq", ["LearnableFakeQuantize", "LSQPlusFakeQuantize", "FixedFakeQuantize"])
def test_prepared_model_step_same_with_and_without_the_kernels(monkeypatch, fq):
    """A whole QAT training step (fused Conv-BN-ReLU, LSQ / LSQ+ / fixed quantizers): the same outputs and input
    gradients, and the same parameter gradients up to summation order (a per-channel scale gradient sums few,
    cancelling terms: 1e-5 of the tensor's largest gradient), with the kernels and with torch's."""
    cfg = {"extra_qconfig_dict": {"w_fakequantize": fq, "a_fakequantize": fq}}
    x = torch.randn(8, 3, 16, 16)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("TS_QAT_FAST_FQ", flag)
        q = _prepared(cfg)
        xi = x.clone().requires_grad_()
        out = q(xi)
        if flag == "1":  # the fused path really ran
            names = {type(fn).__name__ for fn in _grad_fns(out)}
            assert names & {"_LearnableFakeQuantBackward", "_FixedFakeQuantBackward"}, names
            assert "_ChannelScaleBackward" in names, names  # the BN-folding weight scale
            assert "_FoldedBatchNormBackward" in names, names  # the rescale, BatchNorm and ReLU in one kernel
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in q.named_parameters()
                                                 if p.grad is not None}))
    (o1, g1, p1), (o0, g0, p0) = results
    assert torch.equal(o1, o0)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert p1.keys() == p0.keys()
    # the conv's bias is a shift before BatchNorm's batch statistics: its gradient is 0, exactly with the kernel,
    # rounding noise on the eager ops
    assert torch.equal(p1["conv.bias"], torch.zeros_like(p1["conv.bias"]))
    assert p0["conv.bias"].abs().max() < 1e-5 * p0["conv.bn.bias"].abs().max()
    for n in set(p1) - {"conv.bias"}:
        torch.testing.assert_close(p1[n], p0[n], rtol=1e-5, atol=1e-5 * p0[n].abs().max().item() + 1e-9, msg=n)


def _grad_fns(t: torch.Tensor):
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        yield fn
        stack.extend(f for f, _ in fn.next_functions)


def test_bf16_autocast_input_goes_through_float32():
    q = _prepared()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(torch.randn(2, 3, 16, 16))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()


def test_no_compiler_falls_back_to_torch_kernels_with_a_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_lib_error", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TS_QAT_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        assert not K.available()
    assert "C compiler" in caplog.text
    x = torch.randn(4, 16, 9, 9)
    assert not K.usable_for(x, per_channel=False)
    q = _prepared()  # the quantizers still train, on torch's kernels
    q(torch.randn(2, 3, 16, 16)).sum().backward()


def test_the_kernels_build_from_the_c_source_shipped_beside_the_module(monkeypatch, caplog, tmp_path):
    source = Path(K.__file__).with_name("cpu_kernels.c")
    assert "void tsq_forward(" in source.read_text()
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_lib_error", None)
    monkeypatch.setenv("TS_QAT_CACHE", str(tmp_path / "cache"))
    assert K.available() and len(list((tmp_path / "cache").rglob("*.so"))) == 1  # built here, from that file
    x, s, z = torch.randn(4, 16, 9, 9), torch.tensor([0.05]), torch.tensor([3.0])
    torch.testing.assert_close(K.fake_quant_learnable(x, s, z, -1, 0, 255, 1.0),
                               torch._fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 255, 1.0), rtol=0, atol=0)

    # an installation without the file: torch's kernels, and a warning that says what to do
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_lib_error", None)
    monkeypatch.setattr(K, "_SOURCE_PATH", str(tmp_path / "missing.c"))
    monkeypatch.setenv("TS_QAT_CACHE", str(tmp_path / "cache2"))
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        assert not K.available()
    assert "reinstall ts-qat-pytorch" in caplog.text


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_each_tensor_is_fake_quantized_once(arch):
    """No work done twice: a layer's output quantizer is also the next layer's input quantizer (no tensor gets
    two quantizers, and no quantizer feeds another)."""
    import torchvision
    from ts_qat_pytorch.fake_quantize import QuantizeBase
    q = prepare_by_platform(getattr(torchvision.models, arch)(), BackendType.TSQAT)
    seen = set()
    for node in q.graph.nodes:
        if node.op == "call_module" and isinstance(q.get_submodule(node.target), QuantizeBase):
            src = node.args[0]
            assert src not in seen, f"{src.name} is fake-quantized twice"
            seen.add(src)
            assert not (src.op == "call_module" and isinstance(q.get_submodule(src.target), QuantizeBase))


def _hvp(q, x):
    w = q.conv2.weight
    (g,) = torch.autograd.grad(q(x).square().sum(), w, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.ones_like(w)).sum(), w)
    return hv


def test_second_order_gradients_through_the_kernels_match_torch(monkeypatch):
    """Hessian-vector products (create_graph=True, as Hutchinson's trace estimator needs) through the fused
    kernels equal those through torch's kernels (fixed quantizers: torch's learnable kernels have no second
    derivative at all), and work with LSQ."""
    x = torch.randn(8, 3, 16, 16)
    fixed = {"extra_qconfig_dict": {"w_fakequantize": "FixedFakeQuantize", "a_fakequantize": "FixedFakeQuantize"}}
    hvps = []
    for flag in ("1", "0"):
        monkeypatch.setenv("TS_QAT_FAST_FQ", flag)
        hvps.append(_hvp(_prepared(fixed), x))
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-5, atol=1e-6 * hvps[1].abs().max().item())
    monkeypatch.setenv("TS_QAT_FAST_FQ", "1")
    hv = _hvp(_prepared(), x)  # LSQ (the default)
    assert torch.isfinite(hv).all() and hv.abs().sum() > 0
