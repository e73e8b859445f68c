"""The float-fallback ranking (ts_qat_pytorch.analysis.fallback): the metric with each layer alone left float, and
the fewest float layers that win back most of what quantization lost, as prepare_by_platform's exclusions."""
import json

import torch
from torch import nn

from ts_qat_pytorch.analysis import (float_fallback_ranking, layer_quantizers, plot_ranking, recovery_exclude_list,
                                     write_exclude_config)
from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform

from .helpers import prepare_and_calibrate


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_ranking_finds_the_layer_that_hurts_and_the_exclude_list_recovers(tmp_path):
    torch.manual_seed(0)
    model = Three().eval()
    with torch.no_grad():
        model.b.weight[0, 0] = 50.0  # one outlier: a per-tensor grid wide enough for it zeroes the rest of b
    x = torch.randn(256, 8)
    cfg = {"extra_qconfig_dict": {"w_qscheme": {"bit": 8, "per_channel": False}}}
    q = prepare_and_calibrate(model, x, BackendType.Experimental, cfg)
    ref = model(x).detach()
    evaluate = lambda m: -float((m(x) - ref).pow(2).mean())  # noqa: E731  (higher is better)
    assert set(layer_quantizers(q)) == {"a", "b", "c"}
    res = float_fallback_ranking(q, evaluate)
    assert res["rows"][0]["layer"] == "b"
    assert res["float"] > res["quantized"]
    excl = recovery_exclude_list(q, evaluate, res, recover=0.5)
    assert excl["exclude_module_name"][0] == "b" and excl["recovered_fraction"] >= 0.5
    cfg2 = write_exclude_config(excl, str(tmp_path / "ex.json"))
    assert json.loads((tmp_path / "ex.json").read_text()) == cfg2
    # the written config is accepted by prepare_by_platform and leaves b float
    q2 = prepare_by_platform(model, BackendType.Experimental, {**cfg, **cfg2})
    assert type(q2.b) is nn.Linear
    plot_ranking(res, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_one_name_per_concept():
    """``layer_sensitivity`` is mix_precision's per-bit-width estimate; the ranking by float fallback is not."""
    from ts_qat_pytorch import analysis, mix_precision
    assert "layer_sensitivity" in mix_precision.__all__ and not hasattr(analysis, "layer_sensitivity")
