"""Mixed precision: Hutchinson traces agree with the exact Hessian, the bit allocation ILP respects its budget and
favours sensitive layers, its module_qconfig prepares and exports, and accuracy control stops as soon as it can."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.mix_precision import (LayerCost, Sensitivity, accuracy_controlled, allocate_bits,
                                          hutchinson_trace, layer_costs, layer_sensitivity, with_layer_changes)
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.utils.calibrate import calibrate

from .helpers import export_and_run
from .test_advanced_ptq import TinyResNet


def _exact_hessian(model, x, y) -> tuple[torch.Tensor, list[slice]]:
    """The full Hessian of the MSE loss over all parameters (flattened), and each parameter's slice of it."""
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    bounds = list(itertools.accumulate([s.numel() for s in shapes], initial=0))

    def loss(v):
        params = {n: v[a:b].reshape(s) for n, s, a, b in zip(names, shapes, bounds, bounds[1:])}
        return F.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat), [slice(a, b) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("blockwise", [True, False])
def test_hutchinson_trace_agrees_with_the_exact_hessian_trace(blockwise):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    hess, blocks = _exact_hessian(model, x, y)
    n = 400
    est = hutchinson_trace(F.mse_loss(model(x), y), list(model.parameters()), n_samples=n,
                           generator=torch.Generator().manual_seed(1), blockwise=blockwise)
    for e, sl in zip(est, blocks):
        rows = hess[sl, sl] if blockwise else hess[sl, :]  # the joint estimator also sees the other blocks
        off = rows.pow(2).sum() - hess[sl, sl].diagonal().pow(2).sum()
        sigma = float((2 * off / n).sqrt())  # Hutchinson's standard error with Rademacher vectors
        exact = float(hess[sl, sl].trace())
        assert abs(e - exact) <= 4 * sigma + 1e-6, (e, exact, sigma)
    # a linear model under MSE is a quadratic: H = 2/N X^T X, trace known in closed form, within 10 %
    lin = nn.Linear(5, 1, bias=False)
    x = torch.randn(32, 5)
    (tr,) = hutchinson_trace(F.mse_loss(lin(x), torch.zeros(32, 1)), [lin.weight], n,
                             torch.Generator().manual_seed(2))
    assert tr == pytest.approx(float(2 * x.pow(2).sum() / 32), rel=0.1)


def _sens(weight, cands=(2, 4, 8), act=None):
    return Sensitivity(list(weight), cands, weight, "hessian", tuple(sorted(next(iter(act.values())))) if act else (),
                       act or {})


def _brute_force(sens, costs, limit):
    best = None
    for combo in itertools.product(sens.candidates, repeat=len(sens.layers)):
        size = sum(costs[n].params * b for n, b in zip(sens.layers, combo))
        if size <= limit:
            obj = sum(sens.weight[n][b] for n, b in zip(sens.layers, combo))
            best = obj if best is None else min(best, obj)
    return best


def test_ilp_respects_the_budget_and_gives_sensitive_layers_more_bits():
    base = {2: 1.0, 4: 0.1, 8: 0.0}
    weight = {"a": {2: 100.0, 4: 10.0, 8: 0.0}, "b": dict(base), "c": dict(base), "d": dict(base)}
    costs = {n: LayerCost(params=100, macs=1000) for n in weight}
    alloc = allocate_bits(_sens(weight), costs, {"avg_bits": 4})
    assert alloc.achieved["avg_bits"] <= 4
    assert alloc.w_bits["a"] == 8 and all(alloc.w_bits[n] < 8 for n in "bcd")
    assert alloc.objective == pytest.approx(_brute_force(_sens(weight), costs, 400 * 4))
    # the same problem stated as a size budget; and a BOPs budget
    assert allocate_bits(_sens(weight), costs, {"size_bits": 1600}).w_bits == alloc.w_bits
    bops = allocate_bits(_sens(weight), costs, {"bops": 4 * 1000 * 8 * 4})
    assert bops.achieved["bops"] <= 4 * 1000 * 8 * 4 and bops.w_bits["a"] == 8
    # a generous budget: everything at 8 bits, which TSQAT deploys
    full = allocate_bits(_sens(weight), costs, {"avg_bits": 8})
    assert set(full.w_bits.values()) == {8} and full.backend == "TSQAT"
    assert alloc.backend == "Experimental"
    assert alloc.module_qconfig["a"] == {"w_qscheme": {"bit": 8}}


def test_ilp_matches_brute_force_on_uneven_layers():
    torch.manual_seed(0)
    layers = ["l0", "l1", "l2", "l3", "l4"]
    weight = {n: {2: float(torch.rand(())) * 10, 4: float(torch.rand(())), 8: 0.0} for n in layers}
    costs = {n: LayerCost(params=int(p), macs=int(p) * 10) for n, p in zip(layers, [10, 300, 50, 1000, 120])}
    sens = _sens(weight)
    for limit in (2.5, 3.3, 5.0):
        alloc = allocate_bits(sens, costs, {"avg_bits": limit})
        total = sum(c.params for c in costs.values())
        assert alloc.achieved["avg_bits"] <= limit + 1e-9
        assert alloc.objective == pytest.approx(_brute_force(sens, costs, limit * total), rel=1e-6, abs=1e-9)


def test_activation_bits_are_searched_under_a_bops_budget():
    weight = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
    act = {"a": {4: 50.0, 8: 0.0}, "b": {4: 0.01, 8: 0.0}}
    costs = {n: LayerCost(params=10, macs=100) for n in weight}
    alloc = allocate_bits(_sens(weight, (4, 8), act), costs, {"bops": 100 * 8 * 8 + 100 * 8 * 4})
    assert alloc.a_bits == {"a": 8, "b": 4} and alloc.w_bits == {"a": 8, "b": 8}
    assert alloc.module_qconfig["b"] == {"w_qscheme": {"bit": 8}, "a_qscheme": {"bit": 4}}


def test_budget_errors_say_what_is_possible():
    weight = {"a": {2: 1.0, 8: 0.0}}
    costs = {"a": LayerCost(10, 10)}
    with pytest.raises(ValueError, match=r"unknown budget key 'avg_bit'.*did you mean 'avg_bits'"):
        allocate_bits(_sens(weight, (2, 8)), costs, {"avg_bit": 4})
    with pytest.raises(ValueError, match=r"cannot be met.*2 at the least"):
        allocate_bits(_sens(weight, (2, 8)), costs, {"avg_bits": 1})
    with pytest.raises(ValueError, match="exactly one"):
        allocate_bits(_sens(weight, (2, 8)), costs, {"avg_bits": 4, "bops": 1})


def test_sensitivity_search_result_prepares_calibrates_and_exports(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    q = prepare_by_platform(model, "Experimental")
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    sens = layer_sensitivity(q, batches, candidates=(2, 4, 8), n_samples=2)
    assert sens.layers == ["stem.0", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "fc"]
    for n in sens.layers:
        s = sens.weight[n]
        assert s[2] >= s[4] >= s[8] >= 0 and sens.trace[n] > 0, (n, s)
    loss_sens = layer_sensitivity(q, batches, candidates=(2, 8), method="loss", act_candidates=(4,))
    assert set(loss_sens.activation) == set(sens.layers)
    costs = layer_costs(q, batches[0])
    assert costs["stem.0"] == LayerCost(params=8 * 3 * 9, macs=8 * 8 * 8 * 3 * 9)
    assert costs["fc"] == LayerCost(params=40, macs=40)
    alloc = allocate_bits(sens, costs, {"avg_bits": 5})
    assert alloc.achieved["avg_bits"] <= 5 and len(set(alloc.w_bits.values())) > 1
    q2 = prepare_by_platform(model, alloc.backend, alloc.prepare_custom_config_dict())
    bits = {n[: -len(".weight_fake_quant")]: m.scheme.bit for n, m in q2.named_modules()
            if isinstance(m, QuantizeBase) and n.endswith(".weight_fake_quant")}
    assert bits == alloc.w_bits
    calibrate(q2, batches)
    r, outs, ref = export_and_run(q2, batches[0], tmp_path / "mixed.onnx")
    assert r.integer_matmul_kernels == r.quantized_layers
    assert (abs(outs[0] - ref[0]) / r.output_scale[0]).max() <= 1.0


def test_a_non_positive_trace_estimate_is_not_a_free_layer(monkeypatch):
    """A Hutchinson estimate <= 0 is noise, not "no sensitivity": the layer is scored by its measured loss increase
    (as method "loss" scores it), so the allocation does not hand it the fewest bits for free."""
    import ts_qat_pytorch.mix_precision.sensitivity as S
    torch.manual_seed(0)
    q = prepare_by_platform(TinyResNet().eval(), "Experimental")
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    measured = layer_sensitivity(q, batches, candidates=(2, 4, 8), method="loss")
    i = max(range(len(measured.layers)), key=lambda j: measured.weight[measured.layers[j]][2])
    real = S.hutchinson_trace

    def noisy(loss, params, *a, **k):  # the estimate of the layer that 2 bits hurt most comes out negative
        est = real(loss, params, *a, **k)
        return [-abs(e) if j == i else e for j, e in enumerate(est)]

    monkeypatch.setattr(S, "hutchinson_trace", noisy)
    sens = layer_sensitivity(q, batches, candidates=(2, 4, 8), n_samples=2)
    bad = sens.layers[i]
    assert sens.fallback == [bad] and sens.trace[bad] < 0
    assert sens.weight[bad] == measured.weight[bad] and sens.weight[bad][2] > 0  # not 0: not a free layer


def test_accuracy_control_stops_as_soon_as_the_drop_is_within_budget():
    sens = {"a": 5.0, "b": 9.0, "c": 1.0, "d": 7.0}
    built = []

    def build(changes):
        built.append(dict(changes))
        return len(changes)  # the "model": how many layers were raised

    result = accuracy_controlled(build, lambda k: 72.0 + 1.5 * k, float_metric=76.0, max_drop=1.0,
                                 sensitivities=sens, max_layers=4)
    assert [list(c) for c in built] == [[], ["b"], ["b", "d"]]  # most sensitive first, fewest first, then stop
    assert result.within_budget and result.changes == {"b": 8, "d": 8} and result.metric == 75.0
    assert result.drop == pytest.approx(1.0) and len(result.history) == 3

    # never within budget: the best model seen is returned, and says so
    result = accuracy_controlled(lambda ch: len(ch), lambda k: 70.0 + 0.5 * k - (k == 3) * 2, 76.0, 1.0,
                                 ["a", "b", "c"], max_layers=3, bits=None)
    assert not result.within_budget and result.metric == 71.0 and result.changes == {"a": None, "b": None}
    # lower is better (an error rate)
    result = accuracy_controlled(lambda ch: len(ch), lambda k: 10.0 - k, 7.0, 1.0, ["x", "y", "z"],
                                 higher_is_better=False)
    assert result.within_budget and len(result.changes) == 2


def test_layer_changes_become_a_prepare_config():
    cfg = with_layer_changes({"extra_qconfig_dict": {"w_qscheme": {"bit": 4}}}, {"fc": 8, "stem.0": None})
    assert cfg["module_qconfig"] == {"fc": {"w_qscheme": {"bit": 8}, "a_qscheme": {"bit": 8}}}
    assert cfg["extra_quantizer_dict"]["exclude_module_name"] == ["stem.0"]
    q = prepare_by_platform(TinyResNet().eval(), "Experimental", cfg)
    assert q.fc.weight_fake_quant.scheme.bit == 8 and not hasattr(q.get_submodule("stem.0"), "weight_fake_quant")
