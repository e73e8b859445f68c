"""ts_qat_pytorch.tools on the float model: BatchNorm folding, cross-layer equalization (ReLU and ReLU6 chains,
depthwise, torchvision mobilenet_v2), high-bias absorption and SmoothQuant (pre- and post-LayerNorm blocks), and
that prepare_by_platform takes what they return."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.nn import ChannelScale
from ts_qat_pytorch.nn.qat import ConvReLU2d
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.tools import equalize, fold_bn, smooth_quant, smoothing_groups
from ts_qat_pytorch.tools.cle import in_ranges, out_ranges

from .helpers import export_and_run, prepare_and_calibrate
from .models import TinyBert

torch.manual_seed(0)


def _random_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> None:
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
        bn.weight.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        bn.bias.copy_(torch.randn(n, generator=g))


def conv_relu_chain(act=nn.ReLU) -> nn.Sequential:
    """conv-BN-act-(depthwise conv)-BN-act-conv, with layer 1's channels badly scaled against layer 2's (a rescaling
    that leaves the function unchanged: what equalization should undo)."""
    g = torch.Generator().manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), act(),
                      nn.Conv2d(8, 4, 1))
    for bn in (m[1], m[4]):
        _random_bn(bn, g)
    with torch.no_grad():  # channel 0 of the depthwise output 30x larger, the last conv's input 0 30x smaller
        m[4].weight[0] *= 30
        m[4].bias[0] *= 30
        m[6].weight[:, 0] /= 30
    return m.eval()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_fold_bn_conv_and_linear_keeps_outputs_replaces_bn_by_identity():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5)).eval()
    g = torch.Generator().manual_seed(2)
    _random_bn(m[1], g)
    _random_bn(m[5], g)
    x = torch.randn(3, 3, 8, 8)
    folded, report = fold_bn(m, x)
    assert [list(p) for p in report.folded] == [["0", "1"], ["4", "5"]] and not report.not_folded
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[5], nn.Identity)
    assert folded[0].bias is not None and m[0].bias is None  # a bias made; the input model untouched
    with torch.no_grad():
        assert _close(folded(x), m(x))
    assert report.output_change < 1e-5


def test_linear_batchnorm1d_over_a_sequence_is_not_folded():
    class Seq(nn.Module):  # Linear on (N, L, C): BatchNorm1d(L) normalises the positions, not the features
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc(x))
    m = Seq().eval()
    folded, report = fold_bn(m, torch.randn(2, 6, 6))
    assert not report.folded and report.not_folded[0][0] == "bn" and "dimension 1" in report.not_folded[0][1]
    assert isinstance(folded.bn, nn.BatchNorm1d)


def test_cle_leaves_a_relu_model_unchanged_and_equalizes_the_channel_ranges():
    m = conv_relu_chain()
    x = torch.randn(4, 3, 12, 12)
    eq, report = equalize(m, x, high_bias_absorption=False)
    with torch.no_grad():
        assert _close(eq(x), m(x))
    assert report.output_change["fold_bn"] < 1e-5 and report.output_change["cle"] < 1e-5
    assert not report.relu6_replaced and len(report.folded) == 2
    (chain,) = report.chains
    assert chain.layers == ("0", "3", "6") and chain.converged and chain.activations == ("relu", "relu")
    # the paper's fixed point: each pair's layer-1 output range equals layer-2's input range, sqrt(r1 r2)
    for a, b in (("0", "3"), ("3", "6")):
        r1, r2 = out_ranges(eq.get_submodule(a)), in_ranges(eq.get_submodule(b))
        assert torch.allclose(r1, r2, rtol=1e-3)
    # ... and the ranges per channel come closer to the tensor's: the badly scaled layers gain most
    ranges = {r.layer: r for r in report.layers}
    assert ranges["3"].out_after[0] > ranges["3"].out_before[0] + 0.2
    assert ranges["6"].in_after[1] > 10 * ranges["6"].in_before[1]
    assert report.mean_ratio("after") > report.mean_ratio("before")


def test_cle_through_relu6_replaces_it_by_relu_or_leaves_the_link():
    m = conv_relu_chain(nn.ReLU6)
    x = torch.randn(4, 3, 12, 12)
    eq, report = equalize(m, x, high_bias_absorption=False)  # default relu6="relu"
    assert report.relu6_replaced == ("2", "5") and isinstance(eq[2], nn.ReLU) and isinstance(eq[5], nn.ReLU)
    assert report.chains[0].activations == ("relu6 -> relu", "relu6 -> relu")
    ref = copy.deepcopy(m)
    ref[2], ref[5] = nn.ReLU(), nn.ReLU()
    with torch.no_grad():
        assert _close(eq(x), ref(x))  # exact against the model with ReLU instead of ReLU6
        assert not _close(eq(x * 20), m(x * 20), 1e-3)  # and not the ReLU6 model where activations pass 6
    kept, rep2 = equalize(m, x, relu6="keep", high_bias_absorption=False)
    assert not rep2.chains and not rep2.relu6_replaced and len(rep2.skipped) == 2
    assert "ReLU6" in rep2.skipped[0][1]
    with torch.no_grad():
        assert _close(kept(x * 20), m(x * 20))
    with pytest.raises(ValueError, match="relu6 must be one of"):
        equalize(m, x, relu6="clip")


def test_cle_on_torchvision_mobilenet_v2():
    import torchvision
    m = torchvision.models.mobilenet_v2(num_classes=10).eval()
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            _random_bn(mod, g)
    x = torch.randn(2, 3, 64, 64, generator=g)
    eq, report = equalize(m, x, high_bias_absorption=False)
    assert len(report.folded) == 52 and not report.not_folded
    assert len(report.relu6_replaced) == 34  # the ReLU6 of every expand and depthwise output; features.18's stays
    assert isinstance(eq.features[18][2], nn.ReLU6)
    chains = {c.layers for c in report.chains}
    assert ("features.3.conv.0.0", "features.3.conv.1.0", "features.3.conv.2") in chains  # expand -> dw -> project
    assert all(c.converged for c in report.chains) and sum(len(c.layers) for c in report.chains) == 52
    ref = copy.deepcopy(m)
    for name in report.relu6_replaced:
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, nn.ReLU())
    with torch.no_grad():
        assert _close(eq(x), ref(x), 1e-4)
    assert report.mean_ratio("after") > report.mean_ratio("before")
    # prepare takes the folded model: Identity dropped, conv + ReLU fused, nothing left of the BatchNorms
    q = prepare_by_platform(eq, "TSQAT")
    assert isinstance(q.get_submodule("features.3.conv.0.0"), ConvReLU2d)
    assert not any(isinstance(mod, (nn.BatchNorm2d, nn.Identity)) for mod in q.modules())
    # relu6="keep": only the links without a ReLU6 (a project -> next expand without residual), exactly
    kept, rep2 = equalize(m, x, relu6="keep")
    assert not rep2.relu6_replaced and rep2.chains
    assert all(a is None for c in rep2.chains for a in c.activations)
    with torch.no_grad():
        assert _close(kept(x), m(x), 1e-4)


def test_high_bias_absorption_is_exact_where_the_relu_inputs_stay_above_c_and_shrinks_the_bias():
    m = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 1)).eval()
    with torch.no_grad():  # BN output ~ 3 + 0.2 * N(0, 1): c = 3 - 3 * 0.2 = 2.4, and x stays above it
        m[0].weight.uniform_(-0.1, 0.1)
        m[0].bias.zero_()
        m[1].running_mean.zero_()
        m[1].running_var.fill_(1.0)
        m[1].weight.fill_(0.2)
        m[1].bias.fill_(3.0)
    x = torch.rand(5, 4, 6, 6)
    eq, report = equalize(m, x)
    (ab,) = report.absorbed
    assert (ab.layer1, ab.layer2, ab.channels) == ("0", "3", 6)
    assert ab.bias_max_after < 0.5 * ab.bias_max_before
    with torch.no_grad():
        assert _close(eq(x), m(x))
    assert report.output_change["hba"] < 1e-5
    off, rep2 = equalize(m, x, high_bias_absorption=False)
    assert not rep2.absorbed and "hba" not in rep2.output_change


def test_equalize_leaves_the_input_model_and_skips_a_branching_layer():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))   # read by b and by the sum: not a link
            return self.c(torch.relu(self.b(y)) + y)
    m = Residual().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    eq, report = equalize(m, torch.randn(1, 4, 5, 5))
    assert not report.chains
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ---- SmoothQuant
class PreNormBlock(nn.Module):
    """x + FFN(LN(x)) and attention-free Q/K/V projections of LN(x): the LayerNorm is read by Linears only."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return x + self.out(torch.relu(self.q(h)) * self.k(h) + self.v(h))


def _outlier_norms(model: nn.Module) -> None:
    """Give every LayerNorm two outlier channels (x 25, as in BERT's LayerNorm outputs)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.weight[[1, 7]] *= 25
                mod.bias.uniform_(-0.2, 0.2)


def _linear_inputs(model: nn.Module, names, inputs) -> dict[str, torch.Tensor]:
    """max |input| per channel of each named Linear, as its input quantizer would see it."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, n=n: seen.__setitem__(n, a[0].detach().abs().reshape(-1, a[0].shape[-1]).amax(0)))
        for n in names]
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    return seen


def _spread(m: torch.Tensor) -> float:
    return float(m.max() / m.mean())


def test_smoothquant_on_a_pre_layernorm_block_folds_into_the_layernorm():
    m = PreNormBlock().eval()
    _outlier_norms(m)
    batches = [torch.randn(4, 10, 16) for _ in range(3)]
    sq, report = smooth_quant(m, batches, alpha=0.5)
    assert type(sq) is PreNormBlock  # nothing to restore: the model keeps its class, nothing extra to export
    (norm,) = report.norms
    assert (norm.norm, norm.linears, norm.restored_for) == ("ln", ("q", "k", "v"), ())
    with torch.no_grad():
        assert _close(sq(batches[0]), m(batches[0]))
    before = _linear_inputs(m, ["q"], batches[0])["q"]
    after = _linear_inputs(sq, ["q"], batches[0])["q"]
    assert _spread(after) < 0.6 * _spread(before)
    assert norm.act_spread[1] < norm.act_spread[0] and norm.act_max[1] < norm.act_max[0]
    assert report.output_change < 1e-5


def test_smoothquant_on_a_post_layernorm_encoder_restores_the_residual_exactly_and_exports(tmp_path):
    m = TinyBert().eval()
    _outlier_norms(m)
    batches = [torch.randint(0, 100, (4, 12)) for _ in range(3)]
    sq, report = smooth_quant(m, batches)
    assert isinstance(sq, fx.GraphModule)
    names = {n.norm for n in report.norms}
    # the embedding LayerNorm and each layer's ln1 feed Linears and the residual sum; the last ln2 feeds the head
    assert names == {"ln", "layers.0.ln1", "layers.0.ln2", "layers.1.ln1"}
    assert all(n.restored_for for n in report.norms)
    assert sum(isinstance(mod, ChannelScale) for mod in sq.modules()) == 4
    with torch.no_grad():
        assert _close(sq(batches[0]), m(batches[0]))
    before = _linear_inputs(m, ["layers.0.q", "layers.1.ff1"], batches[0])
    after = _linear_inputs(sq, ["layers.0.q", "layers.1.ff1"], batches[0])
    for n in before:
        assert _spread(after[n]) < 0.6 * _spread(before[n]), n
    # the smoothed model prepares, calibrates and exports: ChannelScale stays one float multiply
    q = prepare_and_calibrate(sq, batches[0])
    assert isinstance(q.get_submodule("ln_unsmoothed"), ChannelScale)
    assert not any(isinstance(mod, QuantizeBase) for mod in q.get_submodule("ln_unsmoothed").modules())
    r, outs, ref = export_and_run(q, batches[0][:1], tmp_path / "sq.onnx")
    assert r.quantized_layers == 2 * 6 + 1 and abs(outs[0] - ref[0]).max() < 0.05 * abs(ref[0]).max()


def test_smoothquant_skip_leaves_shared_layernorms_and_errors_say_what_to_do():
    m = TinyBert().eval()
    groups, skipped = smoothing_groups(m, shared_norms="skip")
    assert not groups and len(skipped) == 4 and "ChannelScale" in skipped[0][1]
    batches = [torch.randint(0, 100, (2, 8))]
    with pytest.raises(ValueError, match="no LayerNorm read by a Linear"):
        smooth_quant(m, batches, shared_norms="skip")
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        smooth_quant(m, batches, alpha=1.5)
    with pytest.raises(ValueError, match="no LayerNorm read by a Linear"):
        smooth_quant(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)])
