"""SmoothQuant on the transformers suite's encoder split (post-LayerNorm BERT: each LayerNorm also feeds the
residual sum), and a main.py smoke run of PTQ with every Linear / matmul output quantized (--backend TSQAT: no float
outputs) with --smoothquant --bias-correction."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from suites.common.metrics import load_metrics  # noqa: E402
from suites.transformers import main as suite_main  # noqa: E402
from suites.transformers.model import EncoderClassifier, attention_bias, prepare_config  # noqa: E402
from ts_qat_pytorch.nn import ChannelScale  # noqa: E402
from ts_qat_pytorch.tools import smooth_quant  # noqa: E402

from .test_transformers_suite import minilm_dir, tiny_bert_dir  # noqa: E402,F401  (fixtures)


def _tiny_split():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3, attn_implementation="eager")
    hf = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # BERT-like outlier dimensions in every LayerNorm
        for mod in hf.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.weight[[3, 17]] *= 20
    return hf, EncoderClassifier(hf).eval()


def test_smoothquant_on_the_bert_split_is_exact_and_flattens_the_qkv_inputs():
    hf, split = _tiny_split()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[:2, 12:] = 0
    batches = [(torch.randint(0, 200, (4, 16), generator=g), attention_bias(mask)) for _ in range(2)]
    sq, report = smooth_quant(split, batches, forward=lambda m, b: m(*b), leaf_module=prepare_config()["leaf_module"])
    assert {n.norm for n in report.norms} == {"ln", "blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1"}
    assert report.norms[0].linears == ("blocks.0.q", "blocks.0.k", "blocks.0.v")
    assert sum(isinstance(mod, ChannelScale) for mod in sq.modules()) == 4
    with torch.no_grad():
        ref, out = split(*batches[0]), sq(*batches[0])
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert all(n.act_spread[1] < 0.6 * n.act_spread[0] for n in report.norms)
    # the Hugging Face model the split shares its modules with is untouched (the suite saves it as the float model)
    assert float(hf.bert.embeddings.LayerNorm.weight.detach().max()) > 10


def test_main_smoke_smoothquant_and_bias_correction_without_float_outputs(tiny_bert_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    rc = suite_main.main(["--model", tiny_bert_dir, "--smoke", "--threads", "1", "--max-length", "32",
                          "--onnx-length", "32", "--output-dir", str(out), "--cache-dir", str(out / "cache"),
                          "--device", "cpu", "--backend", "TSQAT", "--smoothquant", "--bias-correction",
                          "--epochs", "0"])
    assert rc == 0
    m = load_metrics(out / "transformers" / "tiny_bert_metrics.json")
    sq, bc = m["extras"]["smoothquant"], m["extras"]["bias_correction"]
    assert len(sq["norms"]) == 4 and all(n["restored_for"] for n in sq["norms"]) and sq["output_change"] < 1e-4
    assert len(bc["layers"]) == 2 * 6 + 2 and bc["corrected"] == m["qat"]
    assert m["integer_kernels"]["QGemm"] == 2 * 6 + 2 and m["integer_kernels"]["QLinearMatMul"] == 2 * 2
    assert m["ort"] is not None
    import onnx
    muls = [n for n in onnx.load(m["files"]["onnx"]).graph.node if n.op_type == "Mul"]
    assert len(muls) >= 4  # the ChannelScales restoring the residual stream, float
