import json
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.utils import utils as U
from ts_qat_pytorch.utils.state import enable_quantization
from ts_qat_pytorch.utils.utils import (load_checkpoint, load_qat_checkpoint, save_checkpoint, save_qat_checkpoint,
                                        strip_module_prefix)

from .helpers import prepare_and_calibrate

X = torch.randn(4, 3, 32, 32)


def _trained_qat(steps=2):
    q = prepare_and_calibrate(torchvision.models.resnet18(num_classes=10).eval(), X)
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(q(X), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q, opt


def test_save_checkpoint_float_weights_load_into_the_original_architecture(tmp_path):
    q, _ = _trained_qat()
    qp = save_checkpoint(q, str(tmp_path / "r18.pth"), str(tmp_path / "r18_qparams.json"))
    float_model = torchvision.models.resnet18(num_classes=10)
    float_model.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=True)
    # the float weights are the QAT model's (not the initial ones)
    assert torch.equal(float_model.conv1.weight, q.conv1.weight.detach())
    assert torch.equal(float_model.bn1.running_mean, q.conv1.bn.running_mean)
    with open(tmp_path / "r18_qparams.json") as f:
        js = json.load(f)
    assert js == json.loads(json.dumps(qp))
    e = js["tensors"]["conv1.weight"]
    assert e["per_channel"] and e["axis"] == 0 and len(e["scale"]) == 64 and e["bit"] == 8
    assert (e["quant_min"], e["quant_max"], e["symmetric"]) == (-128, 127, True)
    a = js["tensors"]["x"]
    assert not a["per_channel"] and (a["quant_min"], a["quant_max"]) == (0, 255) and len(a["zero_point"]) == 1


def test_qat_resume_continues_exactly(tmp_path):
    torch.manual_seed(0)
    q, opt = _trained_qat(steps=1)
    save_qat_checkpoint(str(tmp_path / "ck.pth"), q, opt, epoch=3)
    # uninterrupted: one more step
    loss = F.cross_entropy(q(X), torch.arange(4))
    opt.zero_grad()
    loss.backward()
    opt.step()
    expected = q.state_dict()
    # resumed: a freshly prepared model + optimizer, loaded, one step
    q2 = prepare_by_platform(torchvision.models.resnet18(num_classes=10))
    opt2 = torch.optim.SGD(q2.parameters(), lr=0.01, momentum=0.9)
    ck = load_qat_checkpoint(str(tmp_path / "ck.pth"), q2, opt2)
    assert ck["epoch"] == 3
    q2.train()
    loss = F.cross_entropy(q2(X), torch.arange(4))
    opt2.zero_grad()
    loss.backward()
    opt2.step()
    got = q2.state_dict()
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, got[k]), k
        else:
            assert v == got[k], k


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    U.atomic_torch_save({"a": torch.ones(3)}, path)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        U.atomic_torch_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["m.pth"]  # no temporary left behind


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    U.atomic_torch_save({"w": torch.randn(100)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pth")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(tmp_path / "evil.pth")


def test_module_prefix_is_stripped():
    sd = {"module.a": 1, "module.b.c": 2}
    assert strip_module_prefix(sd) == {"a": 1, "b.c": 2}
    assert strip_module_prefix({"a": 1}) == {"a": 1}


def test_qparams_json_needs_calibration(tmp_path):
    q = prepare_by_platform(torchvision.models.resnet18())
    enable_quantization(q)
    with pytest.raises(RuntimeError, match="never calibrated"):
        save_checkpoint(q, str(tmp_path / "a.pth"), str(tmp_path / "a.json"))
