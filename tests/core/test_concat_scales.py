"""shared_concat_scales: a torch.cat's inputs and output share one quantizer (TSQAT), so an NPU runs the concat as a
memory copy; off (the ONNXRuntime backend, or the extra_quantizer_dict key set False) every tensor has its own."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from ts_qat_pytorch.fake_quantize import QuantizeBase
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
from ts_qat_pytorch.utils.checkpoint import load_qat_checkpoint, save_checkpoint, save_qat_checkpoint

from .helpers import export_and_run, prepare_and_calibrate, qparams

IMG = (2, 3, 8, 8)
OFF = {"extra_quantizer_dict": {"shared_concat_scales": False}}


class TwoRanges(nn.Module):
    """Two branches whose ranges differ tenfold, concatenated along channels, then a conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x) * 10)], 1))


class Nested(nn.Module):
    """A concat of a concat, and a branch that feeds two concats and a conv besides."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(3, 4, 1) for _ in range(3))
        self.side = nn.Conv2d(4, 4, 1)
        self.head, self.head2 = nn.Conv2d(12, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b, c = torch.relu(self.a(x)), torch.relu(self.b(x)) * 3, torch.relu(self.c(x)) * 7
        inner = torch.cat([a, b], 1)
        outer = torch.concat([inner, c], 1)
        other = torch.cat([c, self.side(c)], 1)
        return self.head(outer) + self.head2(other).sum()


class WithIndices(nn.Module):
    """Integer tensors concatenated (argmax indices), next to a float concat."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        idx = torch.cat([a.argmax(1, keepdim=True), b.argmax(1, keepdim=True)], 1)
        return torch.cat([a, b], 1), idx


def _inputs(seed=0):
    return torch.randn(*IMG, generator=torch.Generator().manual_seed(seed))


def _model(cls=TwoRanges):
    torch.manual_seed(0)
    return cls().eval()


def _cat_sites(q, target=(torch.cat, torch.concat)):
    """For each concat node: (its input quantizers, its output quantizer), as modules."""
    out = []
    for node in q.graph.nodes:
        if node.op == "call_function" and node.target in target:
            ins = [q.get_submodule(a.target) for a in node.all_input_nodes if a.op == "call_module"]
            (user,) = node.users
            out.append((ins, q.get_submodule(user.target)))
    return out


def _activation_quantizers(q):
    return {n: m for n, m in q.named_modules() if isinstance(m, QuantizeBase) and not m.is_weight}


def test_tsqat_concat_inputs_and_output_share_one_scale_that_covers_both_branches():
    q = prepare_and_calibrate(_model(), _inputs())
    ((ins, out),) = _cat_sites(q)
    assert len(ins) == 2 and all(m is out for m in ins), "inputs and output must be one quantizer"
    assert out.shared_sites == 3
    # the surviving quantizer keeps the concat's own name; the merged-away ones are gone from the model
    names = _activation_quantizers(q)
    assert "cat_post_act_fake_quantizer" in names
    assert not any(n.startswith(("a_post_act", "relu_1_post_act")) for n in names)
    # observed once per pass over all three tensors: exactly the range of the concat's own output (a moving
    # average over the three calls would settle between the branches and clip the wide one)
    ref = prepare_and_calibrate(_model(), _inputs(), config=OFF)
    s, zp = out.qparams()
    s_ref, zp_ref = ref.cat_post_act_fake_quantizer.qparams()
    assert torch.equal(s, s_ref) and torch.equal(zp, zp_ref)
    assert not torch.equal(ref.a_post_act_fake_quantizer.qparams()[0], ref.relu_1_post_act_fake_quantizer.qparams()[0])


@pytest.mark.parametrize("backend,config", [(BackendType.TSQAT, OFF), (BackendType.ONNXRuntime, None)],
                         ids=["tsqat-key-off", "onnxruntime"])
def test_off_every_concat_tensor_keeps_its_own_scale(backend, config):
    q = prepare_and_calibrate(_model(), _inputs(), backend, config)
    ((ins, out),) = _cat_sites(q)
    scales = [float(m.qparams()[0]) for m in (*ins, out)]
    assert len({id(m) for m in (*ins, out)}) == 3
    assert scales[1] > 5 * scales[0]  # the x10 branch is on a far coarser grid than the other


def test_the_key_overrides_the_backend_default_and_is_validated():
    on = prepare_by_platform(_model(), BackendType.ONNXRuntime,
                             {"extra_quantizer_dict": {"shared_concat_scales": True}})
    ((ins, out),) = _cat_sites(on)
    assert all(m is out for m in ins)
    with pytest.raises(ValueError, match="shared_concat_scales"):
        prepare_by_platform(_model(), BackendType.TSQAT, {"extra_quantizer_dict": {"shared_concat_scales": "yes"}})
    with pytest.raises(ValueError, match="shared_concat_scales"):  # listed among the valid keys
        prepare_by_platform(_model(), BackendType.TSQAT, {"extra_quantizer_dict": {"shared_concat_scale": True}})


def _scale_of(model: onnx.ModelProto, name: str) -> float:
    for init in model.graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return float(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
    raise KeyError(name)


def _concat_grid(path) -> tuple[list[float], list[float]]:
    """Scales of the DequantizeLinear nodes feeding the Concat and of the QuantizeLinear nodes reading it."""
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    (concat,) = [n for n in m.graph.node if n.op_type == "Concat"]
    ins = [producer[i] for i in concat.input]
    assert all(n.op_type == "DequantizeLinear" for n in ins)
    outs = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == concat.output[0]]
    assert outs
    return [_scale_of(m, n.input[1]) for n in ins], [_scale_of(m, n.input[1]) for n in outs]


@pytest.mark.parametrize("shared", [True, False])
def test_export_puts_the_concat_on_one_grid_and_verifies_in_onnxruntime(shared, tmp_path):
    x = _inputs()
    q = prepare_and_calibrate(_model(), x, config=None if shared else OFF)
    r, ort_out, torch_out = export_and_run(q, x, tmp_path / "m.onnx")
    assert np.abs(ort_out[0] - torch_out[0]).max() <= 2.01 * r.output_scale[0]
    ins, outs = _concat_grid(r.onnx_path)
    if shared:
        assert len(set(ins + outs)) == 1
        tensors = qparams(r.qparams_path)["tensors"]
        assert tensors["a"]["scale"] == tensors["relu_1"]["scale"] == tensors["cat"]["scale"]
    else:
        assert len(set(ins)) == 2


def test_nested_and_branching_concats_form_one_group():
    q = prepare_and_calibrate(_model(Nested), _inputs())
    sites = _cat_sites(q)
    assert len(sites) == 3
    shared = {id(m) for ins, out in sites for m in (*ins, out)}
    assert len(shared) == 1, "a concat of a concat, and an input read by two concats, join one group"
    (fq,) = {m for ins, out in sites for m in (*ins, out)}
    # a, b, c (one call, read by both concats and the side conv), side, inner, outer, other; named after the last
    assert fq.shared_sites == 7 and fq.qualname == "cat_1_post_act_fake_quantizer"
    # the conv reading c keeps its int32 bias on c's grid: the shared quantizer
    assert q.side.input_fake_quant is fq
    with torch.no_grad():
        assert torch.isfinite(q(_inputs(1))).all()


def test_integer_inputs_are_left_alone():
    q = prepare_and_calibrate(_model(WithIndices), _inputs())
    (int_ins, int_out), (ins, out) = _cat_sites(q)
    assert all(m is out for m in ins)
    assert not any(m is int_out for m in int_ins) and len({id(m) for m in int_ins}) == 2
    with torch.no_grad():
        _, idx = q(_inputs(1))
    assert not idx.is_floating_point()


def test_bounded_activations_keep_their_cap_only_when_every_input_has_it():
    class Bounded(TwoRanges):
        def __init__(self, both):
            super().__init__()
            self.both = both

        def forward(self, x):
            b = torch.nn.functional.relu6(self.b(x)) if self.both else torch.relu(self.b(x))
            return self.head(torch.cat([torch.nn.functional.relu6(self.a(x)), b], 1))

    torch.manual_seed(0)
    ((_, out),) = _cat_sites(prepare_by_platform(Bounded(True).eval()))
    assert out.max_scale == pytest.approx(6.0 / 255)  # the concat copies two ReLU6 outputs: still within [0, 6]
    torch.manual_seed(0)
    ((_, out),) = _cat_sites(prepare_by_platform(Bounded(False).eval()))
    assert out.max_scale is None


def test_checkpoints_round_trip_with_a_shared_quantizer(tmp_path):
    x = _inputs()
    q = prepare_and_calibrate(_model(), x)
    keys = list(q.state_dict())
    assert not any(k.startswith(("a_post_act", "relu_1_post_act")) for k in keys)
    save_qat_checkpoint(str(tmp_path / "qat.pth"), q)
    fresh = prepare_by_platform(_model())
    load_qat_checkpoint(str(tmp_path / "qat.pth"), fresh)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    ((ins, out),) = _cat_sites(fresh)
    assert all(m is out for m in ins)
    saved = save_checkpoint(q, str(tmp_path / "float.pth"), str(tmp_path / "q.json"))
    assert len({saved["tensors"][t]["scale"][0] for t in ("a", "relu_1", "cat")}) == 1
    float_keys = set(torch.load(str(tmp_path / "float.pth"), weights_only=True))
    assert float_keys == set(_model().state_dict())


def test_mixed_precision_reaches_the_shared_quantizer_of_every_site():
    cfg = {"extra_qconfig_dict": {"w_qscheme": {"bit": 4}, "a_qscheme": {"bit": 4}},
           "module_qconfig": {"head": {"a_qscheme": {"bit": 8}}}}
    q = prepare_by_platform(_model(), BackendType.Experimental,
                            {**cfg, "extra_quantizer_dict": {"shared_concat_scales": True}})
    ((ins, out),) = _cat_sites(q)
    assert all(m is out for m in ins) and out.quant_max == 255 and out.shared_sites == 3


def test_a_checkpoint_with_one_quantizer_per_tensor_names_the_key_that_loads_it(tmp_path):
    old = prepare_and_calibrate(_model(), _inputs(), config=OFF)
    save_qat_checkpoint(str(tmp_path / "old.pth"), old)
    with pytest.raises(ValueError, match="shared_concat_scales': False"):
        load_qat_checkpoint(str(tmp_path / "old.pth"), prepare_by_platform(_model()))
    load_qat_checkpoint(str(tmp_path / "old.pth"), prepare_by_platform(_model(), BackendType.TSQAT, OFF))


def test_calibration_with_fake_quantization_on_from_the_start():
    from ts_qat_pytorch.utils.state import enable_calibration_quantization
    q = prepare_by_platform(_model())
    q.eval()
    enable_calibration_quantization(q)
    with torch.no_grad():
        for seed in range(3):  # the first pass needs a scale before the concat's own site is reached
            assert torch.isfinite(q(_inputs(seed))).all()
    assert q.cat_post_act_fake_quantizer.initialized
