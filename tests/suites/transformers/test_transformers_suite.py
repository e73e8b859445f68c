"""Transformers suite tests: the R-data parser and chapter split on the real package, the split model against
Hugging Face on real MiniLM weights and text, quantization coverage, ORT export, bad inputs, a main.py smoke.

Real assets (all-MiniLM-L6-v2 weights, janeaustenr) come from suites.common.assets (pip / apt)."""
from __future__ import annotations

import json
import operator
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from suites.common.metrics import load_metrics  # noqa: E402
from suites.transformers import data  # noqa: E402
from suites.transformers import main as suite_main  # noqa: E402
from suites.transformers.model import (EncoderClassifier, attention_bias, check_and_load, count_targets,  # noqa: E402
                                       prepare_config)

TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
         "want of a wife.", "Emma Woodhouse, handsome, clever, and rich.", "Capt. Wentworth had no fortune."]
LINE_COUNTS = {"emma": 16235, "mansfieldpark": 15349, "northangerabbey": 7856, "persuasion": 8328,
               "prideprejudice": 13030, "sensesensibility": 12624}


@pytest.fixture(scope="module")
def novels():
    from suites.common.assets import _JANE, JANEAUSTENR
    files = JANEAUSTENR.fetch()
    return data.load_novels(files[_JANE + "Rdata.rdb"], files[_JANE + "Rdata.rdx"])


@pytest.fixture(scope="module")
def minilm_dir():
    from suites.common.assets import MINILM_L6
    return MINILM_L6.fetch()


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    torch.manual_seed(0)
    return check_and_load(minilm_dir, 6, 128)


@pytest.fixture(scope="module")
def tiny_bert_dir(minilm_dir, tmp_path_factory):
    """A 2-layer random BERT with MiniLM's vocabulary and tokenizer (fast export / smoke runs)."""
    from transformers import BertConfig, BertForSequenceClassification
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=6)
    BertForSequenceClassification(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_dir, f), d)
    return str(d)


def test_rdata_parser_reads_six_novels_line_by_line(novels):
    assert {k: len(v) for k, v in novels.items()} == LINE_COUNTS
    assert novels["prideprejudice"][0] == "PRIDE AND PREJUDICE"
    assert any("truth universally acknowledged" in s for s in novels["prideprejudice"][:200])
    assert novels["emma"][0] == "EMMA"


def test_chapter_split_never_shares_a_chapter(novels):
    assert [len(data.chapters(novels[n])) for n in data.NOVELS] == [55, 48, 31, 24, 61, 50]
    train, test = data.austen_split(novels, n_lines=4)
    tr_ch, te_ch = {e[2] for e in train}, {e[2] for e in test}
    assert tr_ch and te_ch and not tr_ch & te_ch
    assert {e[1] for e in train} == {e[1] for e in test} == set(range(6))
    assert not {e[0] for e in train} & {e[0] for e in test}
    assert not any(data.CHAPTER_RE.match(e[0]) for e in train[:500])


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_float_split_equals_hf_logits_on_real_minilm(minilm, padding):
    tok, hf = minilm
    enc = tok(TEXTS, padding=padding, max_length=48, truncation=True, return_tensors="pt")
    assert int(enc["attention_mask"].sum(1).min()) < enc["input_ids"].shape[1]  # real padding in the batch
    with torch.no_grad():
        ref = hf(**enc).logits
        out = EncoderClassifier(hf).eval()(enc["input_ids"], attention_bias(enc["attention_mask"]))
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_float_split_equals_hf_logits_other_families(family):
    from transformers import AutoModelForSequenceClassification, DistilBertConfig, RobertaConfig
    torch.manual_seed(0)
    cfg = (RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40, num_labels=3) if family == "roberta" else
           DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3))
    hf = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(3, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:], mask[2, 5:] = 0, 0
    ids[mask == 0] = cfg.pad_token_id
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = EncoderClassifier(hf).eval()(ids, attention_bias(mask))
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_prepare_quantizes_every_linear_and_both_attention_matmuls(minilm):
    from ts_qat_pytorch.nn.qat import modules as qat
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    _, hf = minilm
    split = EncoderClassifier(hf).eval()
    linears, matmuls = count_targets(split)
    assert (linears, matmuls) == (6 * 6 + 2, 12)
    q = prepare_by_platform(split, BackendType.ONNXRuntime, prepare_config())
    assert sum(isinstance(m, qat.Linear) for m in q.modules()) == linears
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert sum(isinstance(m, qat.Embedding) for m in q.modules()) == 3
    mm = [n for n in q.graph.nodes if n.op == "call_function" and n.target in (torch.matmul, operator.matmul)]
    assert len(mm) == matmuls
    for n in mm:  # both operands come from an activation fake quantizer
        for a in n.args[:2]:
            src = a
            while src.op != "call_module" and src.args:  # through passthrough views / transposes
                src = src.args[0]
            assert src.op == "call_module" and "fake_quantizer" in src.target, (n, a)
    kinds = {type(q.get_submodule(n.target)).__name__ for n in q.graph.nodes if n.op == "call_module"}
    assert {"MaskedSoftmax", "LayerNorm", "ResidualSum"} <= kinds  # float per the operator table / the split
    # the residual stream stays float: no quantizer reads a residual sum (its outliers ruin a per-tensor grid),
    # and the o / ff2 Linear layers feeding it write float (float_outputs: QGemm with float output in onnxruntime)
    from ts_qat_pytorch.fake_quantize import QuantizeBase
    sums = [n for n in q.graph.nodes if n.op == "call_module" and type(q.get_submodule(n.target)).__name__ ==
            "ResidualSum"]
    assert len(sums) == 2 * 6 + 2
    for n in sums:
        assert not any(u.op == "call_module" and isinstance(q.get_submodule(u.target), QuantizeBase) for u in n.users)
        if n.target.startswith("blocks."):  # the o / ff2 output goes straight in, unquantized
            assert isinstance(q.get_submodule(n.args[0].target), qat.Linear)


def _bad(argv, capsys, match):
    assert suite_main.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_bad_inputs_fail_early_with_clear_errors(tmp_path, capsys, minilm_dir, tiny_bert_dir):
    out = ["--output-dir", str(tmp_path / "o"), "--smoke"]
    empty = tmp_path / "empty_model"
    empty.mkdir()
    _bad(["--model", str(empty), *out], capsys, "has no config.json")
    from transformers import GPT2Config
    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    _bad(["--model", str(tmp_path / "gpt2"), *out], capsys, "supported families: BERT")
    _bad(["--max-length", "1000", *out], capsys, "beyond the model's position embeddings (512")
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    (tokdir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    (tokdir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    _bad(["--tokenizer", str(tokdir), *out], capsys, "does not match the model's vocabulary")
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("")
    (d / "test.jsonl").write_text('{"text": "x", "label": "a"}\n')
    _bad(["--data", str(d), "--model", tiny_bert_dir, *out], capsys, "no examples (the file is empty)")
    (d / "train.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y"}\n')
    _bad(["--data", str(d), "--model", tiny_bert_dir, *out], capsys, "unlabeled example")
    assert not (tmp_path / "o" / "encoder_int8.onnx").exists()


@pytest.fixture(scope="module")
def smoke_run(tiny_bert_dir, tmp_path_factory):
    """main.py end to end on a tiny subset with a 2-layer random BERT (MiniLM's tokenizer)."""
    out = tmp_path_factory.mktemp("run")
    rc = suite_main.main(["--model", tiny_bert_dir, "--smoke", "--threads", "1", "--max-length", "32",
                          "--onnx-length", "32", "--output-dir", str(out)])
    return rc, out


def test_main_smoke_writes_metrics_and_onnx(smoke_run):
    rc, out = smoke_run
    assert rc == 0
    m = load_metrics(out / "encoder_metrics.json")  # the suites' one schema
    assert (m["suite"], m["arch"], m["backend"], m["metric"]) == ("transformers", "encoder", "ONNXRuntime", "accuracy")
    for k in ("float", "qat", "ort"):
        assert 0.0 <= m[k] <= 100.0 and m[k] == m["scores"][k]["accuracy"] and "macro_f1" in m["scores"][k]
    assert m["integer_kernels"]["QGemm"] == m["extras"]["split"]["linear"] == 2 * 6 + 2
    # QK^T feeds the float softmax: its integer kernel writes float (MatMulIntegerToFloat); P.V -> QLinearMatMul
    assert m["integer_kernels"]["QLinearMatMul"] == m["integer_kernels"]["MatMulIntegerToFloat"] == 2
    assert m["extras"]["split"]["attention_matmuls"] == 2 * 2
    assert "QLinearAdd" not in m["integer_kernels"]  # the residual sums run as float Adds
    assert m["extras"]["ort_latency"]["fp32_ms"] > 0 and m["extras"]["ort_latency"]["int8_ms"] > 0
    assert {"setup", "float_train", "float_eval", "calibration", "qat_train", "qat_eval", "export", "ort_eval"} \
        <= set(m["times_s"])
    import onnx
    onnx.checker.check_model(str(out / "encoder_int8.onnx"))
    assert json.loads((out / "encoder_qparams.json").read_text())["tensors"]


def test_exported_int8_model_agrees_with_fake_quant(smoke_run, tiny_bert_dir):
    """The QAT checkpoint of the smoke run, re-prepared, against its QDQ ONNX in onnxruntime."""
    from ts_qat_pytorch.onnx.verify import ort_session
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    from ts_qat_pytorch.utils.utils import load_qat_checkpoint
    from suites.transformers.pipeline import calibrate
    rc, out = smoke_run
    assert rc == 0
    tok, hf = check_and_load(tiny_bert_dir, 6, 32)
    q = prepare_by_platform(EncoderClassifier(hf).eval(), BackendType.ONNXRuntime, prepare_config())
    enc = tok(TEXTS * 3, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    ids, mask = enc["input_ids"][:8], enc["attention_mask"][:8]
    calibrate(q, [(ids, mask, None)], 1)
    load_qat_checkpoint(str(out / "encoder_qat_checkpoint.pth"), q)
    q.eval()
    bias = attention_bias(mask)
    ort = ort_session(str(out / "encoder_int8.onnx")).run(None, {"input_ids": ids.numpy(),
                                                                 "attention_bias": bias.numpy()})[0]
    with torch.no_grad():
        ref = q(ids, bias).numpy()
    scale = json.loads((out / "encoder_qparams.json").read_text())
    assert np.abs(ort - ref).max() < 0.05 * (np.abs(ref).max() + 1e-6) + 1e-3, (ort, ref)
    assert (ort.argmax(1) == ref.argmax(1)).mean() >= 0.85
    assert scale["tensors"]


def _tiny_data(root):
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"passage number {i} about {'tea' if i % 2 else 'war'}", "label": "ab"[i % 2]} for i in range(8)]
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def test_resume_is_checked_first_with_clear_errors(tmp_path, capsys, monkeypatch, tiny_bert_dir):
    """--resume (missing, empty, truncated, not QAT, another model's, another backend) fails before the data, the
    model and calibration; a --lr other than the checkpoint's is reported with both values."""
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    from ts_qat_pytorch.utils.utils import save_qat_checkpoint
    from suites.transformers.data import DataError
    from suites.transformers.model import ModelError
    from suites.transformers.pipeline import calibrate

    def no_data(args):
        raise DataError("the data was read: --resume was not checked first")
    monkeypatch.setattr(suite_main, "load_data", no_data)
    base = ["--model", tiny_bert_dir, "--smoke", "--output-dir", str(tmp_path / "o")]
    blob = tmp_path / "blob.pt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, blob)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "trunc.pth").write_bytes(blob.read_bytes()[:300])
    torch.save({"word.weight": torch.zeros(3, 2)}, tmp_path / "float.pth")
    torch.save({"state_dict": {"model.0.conv.weight": torch.zeros(1), "model.0.conv.weight_fake_quant.scale":
                               torch.ones(1)}}, tmp_path / "yolo.pth")
    qsd = {"word.weight": torch.zeros(3, 2), "blocks.0.q.weight": torch.zeros(2, 2),
           "blocks.0.q.weight_fake_quant.scale": torch.ones(2)}
    torch.save({"state_dict": qsd, "backend": "TSQAT"}, tmp_path / "tsqat.pth")
    for name, msg in (("missing.pth", "does not exist"), ("empty.pth", "is empty (0 bytes)"),
                      ("trunc.pth", "could not be read"), ("float.pth", "is not a QAT checkpoint"),
                      ("yolo.pth", "not a checkpoint of this suite's encoder split"),
                      ("tsqat.pth", "was trained with --backend TSQAT, this run uses --backend ONNXRuntime")):
        _bad([*base, "--resume", str(tmp_path / name)], capsys, msg)
    # a --lr other than the checkpoint's: one warning line naming both (the checkpoint's is used)
    torch.save({"state_dict": qsd, "backend": "ONNXRuntime", "epoch": 1,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "initial_lr": 2e-5, "params": [0]}]},
                "scheduler": {"base_lrs": [2e-5], "last_epoch": 2}}, tmp_path / "q.pth")
    _bad([*base, "--resume", str(tmp_path / "q.pth"), "--lr", "3e-4"], capsys, "was not checked first")
    assert suite_main.main([*base, "--resume", str(tmp_path / "q.pth"), "--lr", "3e-4"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.0003 differs from the learning rate 2e-05 of --resume" in err
    assert "the checkpoint's 2e-05 is used" in err
    # against the loaded model (before the float stage and calibration): a real checkpoint of the split fits; one
    # of another model or other labels does not
    tok, hf = check_and_load(tiny_bert_dir, 6, 32)
    labels = list("abcdef")
    q = prepare_by_platform(EncoderClassifier(hf).eval(), BackendType.ONNXRuntime, prepare_config())
    enc = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    calibrate(q, [(enc["input_ids"], enc["attention_mask"], None)], 1)
    save_qat_checkpoint(str(tmp_path / "real.pth"), q, epoch=1, labels=labels)
    args = suite_main.resolve(suite_main.build_parser().parse_args(["--resume", str(tmp_path / "real.pth")]))
    ck = suite_main.check_resume(args)
    suite_main.check_resume_fits(ck, hf, labels, "real.pth")
    with pytest.raises(ModelError, match=r"trained on the labels \['a', 'b', .*'f'\], the data has \['x', 'y', 'z'\]"):
        suite_main.check_resume_fits(ck, hf, ["x", "y", "z"], "real.pth")
    from transformers import BertConfig, BertForSequenceClassification
    other = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=64, num_labels=6))
    with pytest.raises(ModelError, match=r"does not fit the model .*word\.weight: \(30522, 32\) in the file, "
                                         r"\(30522, 16\) in the model"):
        suite_main.check_resume_fits(ck, other, labels, "real.pth")


def test_model_folder_without_weights_or_with_truncated_weights(tmp_path, capsys, tiny_bert_dir):
    from suites.transformers.model import ModelError
    d = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, d)
    weights = (d / "model.safetensors").read_bytes()
    data_dir = _tiny_data(tmp_path / "data")
    out = ["--data", data_dir, "--smoke", "--output-dir", str(tmp_path / "o")]
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"the folder has no weights \(none of model\.safetensors"):
        check_and_load(str(d), 2, 32)
    _bad(["--model", str(d), *out], capsys, f"--model {d}: the folder has no weights")
    (d / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    _bad(["--model", str(d), *out], capsys, f"--model {d}: the weights file model.safetensors is truncated or corrupt")
    (d / "model.safetensors").write_bytes(b"")
    _bad(["--model", str(d), *out], capsys, "the weights file model.safetensors is empty (0 bytes)")
    (d / "model.safetensors").write_bytes(weights)
    assert check_and_load(str(d), 6, 32)[1].num_labels == 6


class _RunsCode:
    """Unpickling this with weights_only=False would create MARKER (builtins.open)."""
    MARKER = ""

    def __reduce__(self):
        return (open, (self.MARKER, "w"))


@pytest.mark.parametrize("force_no_weights_only", [False, True])
def test_float_cache_is_loaded_with_weights_only(tmp_path, monkeypatch, force_no_weights_only):
    """The float fine-tune cache loads with weights_only=True: a pickle that would run code is refused with a
    clear error (also when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, which overrides only an unspecified weights_only)."""
    import argparse
    from suites.transformers.model import ModelError
    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    else:
        monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    marker = tmp_path / "pwned"
    _RunsCode.MARKER = str(marker)
    args = argparse.Namespace(float_epochs=1, smoke=False, max_length=32, float_lr=2e-4, batch_size=8, seed=0,
                              cache_dir=str(tmp_path / "cache"), evaluate=False, resume="")
    train = [("some text", 0, 0)]
    path = suite_main.float_cache_path(args, "model", train)
    torch.save({"weight": _RunsCode()}, path)
    with pytest.raises(ModelError, match=r"the cached float fine-tune .* cannot be used .*delete it"):
        suite_main.float_stage(torch.nn.Linear(1, 1), None, args, None, "model", train)
    assert not marker.exists()
    # a genuine cache (a state_dict of tensors) still loads
    lin = torch.nn.Linear(2, 2)
    torch.save(lin.state_dict(), path)

    class _Stages:
        run: dict = {}
    other = torch.nn.Linear(2, 2)
    suite_main.float_stage(other, None, args, _Stages(), "model", train)
    assert torch.equal(other.weight, lin.weight)
