"""Loading a Hugging Face encoder classifier with checks, and the split that torch.fx can trace.

Why a split: under transformers 5 ``torch.fx.symbolic_trace(BertModel)`` fails (the output handling in
transformers/utils/generic.py assigns into a Proxy; the ``transformers.utils.fx`` tracer was removed), and
the mask construction, attention-interface dispatch, output dataclasses and ``**kwargs`` plumbing of
``BertModel.forward`` are not network computation anyway. So:

* outside the traced part (float, in Python): tokenization and the additive attention mask
  (``attention_bias``: 0 for tokens, finfo.min for padding, shape (B, 1, 1, L)), exactly as HF's eager path;
* the traced part, :class:`EncoderClassifier`, takes ``(input_ids, attention_bias)`` and returns logits.
  It holds the HF model's own submodules (Embedding, Linear, LayerNorm, activation) and re-states only the
  glue of ``forward``: embeddings -> per layer: q/k/v Linear, ``torch.matmul(q, k^T)``, masked softmax,
  ``torch.matmul(p, v)``, output Linear + residual + LayerNorm, FFN -> pooler / head. Both attention matmuls
  are plain ``torch.matmul`` calls the tracer sees (eager attention, never SDPA), so both get quantized.
* :class:`MaskedSoftmax` (``softmax(scores * scale + bias)``) is a leaf module: it stays float (softmax is
  float in the operator table) and, being one node, the additive mask never meets a quantized ``add`` --
  a -3.4e38 mask value inside an observed add would ruin that quantizer's range.
* position ids (RoBERTa's: cumsum over ``ids != pad``) are integer index arithmetic: the leaf
  :class:`PositionIds` keeps them out of the quantizer (a quantized ``mul`` on integers is wrong).

Dropout is left out of the split (QAT runs without it); the float fine-tune uses the HF model itself.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = {"bert": "BERT (incl. MiniLM)", "roberta": "RoBERTa", "distilbert": "DistilBERT"}


class ModelError(ValueError):
    """A model / tokenizer / max-length problem, reported before long work starts."""


def check_and_load(model_path: str, num_labels: int, max_length: int, tokenizer_path: str | None = None,
                   weights: bool = True):
    """(tokenizer, HF model for sequence classification with eager attention), or ModelError."""
    tok, config = load_tokenizer(model_path, max_length, tokenizer_path)
    return tok, load_model(model_path, config, num_labels, weights)


def load_tokenizer(model_path: str, max_length: int, tokenizer_path: str | None = None):
    """(tokenizer, config) of a supported model, checked against each other and --max-length (cheap: no weights
    are read), or ModelError."""
    from transformers import AutoConfig, AutoTokenizer
    if os.path.isdir(model_path) and not os.path.exists(os.path.join(model_path, "config.json")):
        raise ModelError(f"--model {model_path}: the folder has no config.json (a Hugging Face model folder "
                         f"holds config.json, the weights and the tokenizer files)")
    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError / ValueError / EnvironmentError
        raise ModelError(f"--model {model_path}: cannot read its config ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from e
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED:
        raise ModelError(f"--model {model_path}: architecture '{mt}' is not supported; supported families: "
                         + ", ".join(f"{v} (model_type '{k}')" for k, v in SUPPORTED.items()))
    limit = positions(config)
    if max_length > limit:
        raise ModelError(f"--max-length {max_length} is beyond the model's position embeddings "
                         f"({limit} positions); use --max-length <= {limit}")
    if max_length < 2:
        raise ModelError("--max-length must be at least 2")
    tok_path = tokenizer_path or model_path
    try:
        tok = AutoTokenizer.from_pretrained(tok_path)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load a tokenizer from {tok_path} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from e
    check_tokenizer(tok, config, tok_path)
    return tok, config


def positions(config) -> int:
    """The longest input the model's position embeddings cover (RoBERTa's start after the padding id)."""
    return config.max_position_embeddings - (config.pad_token_id + 1 if config.model_type == "roberta" else 0)


def load_model(model_path: str, config, num_labels: int, weights: bool = True):
    """The HF classifier (eager attention, eval mode) with ``num_labels`` outputs: the folder's / hub's weights
    (checked first: present and whole), or a random initialisation from ``config`` (``weights=False``)."""
    from transformers import AutoModelForSequenceClassification
    config.num_labels = num_labels
    if not weights:
        return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()
    if os.path.isdir(model_path):
        check_weight_files(model_path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, config=config,
                                                                   attn_implementation="eager")
    except Exception as e:  # noqa: BLE001 - OSError, safetensors / zip errors, shape mismatches, ...
        raise ModelError(f"--model {model_path}: cannot load the weights ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:300]}); the weights must be complete and belong to "
                         "the model config.json describes") from e
    return model.eval()


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weight_files(model_dir: str) -> None:
    """A local model folder holds weights, and its safetensors files are whole (the header reads and the data
    cover what it lists: a truncated copy fails here, in milliseconds, instead of inside from_pretrained)."""
    import json
    have = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, f))]
    if not have:
        raise ModelError(f"--model {model_dir}: the folder has no weights (none of {', '.join(WEIGHT_FILES)}); "
                         "config.json alone describes the architecture: copy the model's weights file into the folder")
    files = ["model.safetensors"] if "model.safetensors" in have else []
    for index in (f for f in have if f.endswith(".index.json")):
        try:
            with open(os.path.join(model_dir, index)) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        except Exception as e:  # noqa: BLE001 - bad JSON, no weight_map
            raise ModelError(f"--model {model_dir}: {index} is not a weights index ({type(e).__name__}: {e})") from e
        missing = [f for f in shards if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise ModelError(f"--model {model_dir}: {index} lists weight shards that are missing: "
                             f"{', '.join(missing[:5])}")
        files += shards
    for f in files:
        path = os.path.join(model_dir, f)
        if os.path.getsize(path) == 0:
            raise ModelError(f"--model {model_dir}: the weights file {f} is empty (0 bytes): copy it again")
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(path, "pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - SafetensorError
                raise ModelError(f"--model {model_dir}: the weights file {f} is truncated or corrupt "
                                 f"({(str(e).splitlines() or [''])[0]}): copy it again") from e


def check_tokenizer(tok, config, where: str) -> None:
    """The tokenizer must produce ids the model's embedding table has, with the same padding id. Models often
    pad their vocabulary to a multiple of 8..128 rows, so a model vocabulary up to 128 rows larger is fine."""
    n, v = len(tok), config.vocab_size
    pad = tok.pad_token_id
    if n > v or v - n > 128 or (pad is not None and config.pad_token_id is not None and pad != config.pad_token_id):
        raise ModelError(f"the tokenizer at {where} does not match the model's vocabulary: tokenizer has {n} "
                         f"tokens (pad id {pad}), the model's embedding has {v} rows (pad id "
                         f"{config.pad_token_id}); pass the model's own tokenizer (--tokenizer)")


def attention_bias(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """0/1 attention mask (B, L) -> additive bias (B, 1, 1, L): 0 where attended, finfo.min on padding."""
    return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).contiguous()


class MaskedSoftmax(nn.Module):
    """softmax(scores * scale + bias) over the keys: a float leaf of the traced graph."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, scores, bias):
        return F.softmax(scores * self.scale + bias, dim=-1)


class PositionIds(nn.Module):
    """Position ids for the token ids: ``arange(L)`` (BERT, DistilBERT) or RoBERTa's padding-aware ids
    (cumsum over ``ids != pad``, padding stays at padding_idx). A leaf: integer index arithmetic is never
    quantized (and slicing a buffer by the traced length is not traceable)."""

    def __init__(self, max_positions: int, padding_idx: int | None = None):
        super().__init__()
        self.padding_idx = padding_idx
        self.register_buffer("ids", torch.arange(max_positions).unsqueeze(0), persistent=False)

    def forward(self, ids):
        if self.padding_idx is None:
            return self.ids[:, :ids.shape[1]]
        m = ids.ne(self.padding_idx).int()
        return (torch.cumsum(m, dim=1).type_as(m) * m).long() + self.padding_idx


class ResidualSum(nn.Module):
    """``a + b`` on the residual stream (the sums LayerNorm normalises): a float leaf of the traced graph.

    BERT-family residual streams carry a few hidden dimensions far larger than the rest, so one per-tensor 8-bit
    grid for the sum wastes almost every level on them. Measured on the embedded default (post-training, all
    else quantized): float 80.58 %, every sum quantized 78.33 %, the residual sums float 79.75 %. The Linear
    layers around them keep their integer kernels (their outputs are still quantized); onnxruntime runs the
    float Add where it would run QLinearAdd, and LayerNorm is float either way."""

    def forward(self, a, b):
        return a + b


class Block(nn.Module):
    """One encoder layer, built from the HF layer's own submodules (post-LayerNorm, as BERT/DistilBERT)."""

    def __init__(self, q, k, v, o, ln1, ff1, act, ff2, ln2, heads: int):
        super().__init__()
        self.q, self.k, self.v, self.o, self.ln1 = q, k, v, o, ln1
        self.ff1, self.act, self.ff2, self.ln2 = ff1, act, ff2, ln2
        self.heads, self.dk = heads, q.out_features // heads
        self.softmax = MaskedSoftmax(self.dk ** -0.5)
        self.res1, self.res2 = ResidualSum(), ResidualSum()

    def forward(self, x, bias):
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, self.dk).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, self.dk).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.dk).transpose(1, 2)
        p = self.softmax(torch.matmul(q, k.transpose(2, 3)), bias)
        ctx = torch.matmul(p, v).transpose(1, 2).reshape(b, n, d)
        x = self.ln1(self.res1(self.o(ctx), x))
        return self.ln2(self.res2(self.ff2(self.act(self.ff1(x))), x))


class EncoderClassifier(nn.Module):
    """The traced, quantized part: (input_ids (B, L) int64, attention_bias (B, 1, 1, L) float) -> logits."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        mt = hf_model.config.model_type
        if mt not in SUPPORTED:
            raise ModelError(f"architecture '{mt}' is not supported; supported: {', '.join(SUPPORTED.values())}")
        self.family = mt
        if mt in ("bert", "roberta"):
            enc = getattr(hf_model, mt)
            e = enc.embeddings
            self.word, self.pos, self.tok_type, self.ln = (e.word_embeddings, e.position_embeddings,
                                                       e.token_type_embeddings, e.LayerNorm)
            self.blocks = nn.ModuleList(
                Block(L.attention.self.query, L.attention.self.key, L.attention.self.value,
                      L.attention.output.dense, L.attention.output.LayerNorm, L.intermediate.dense,
                      L.intermediate.intermediate_act_fn, L.output.dense, L.output.LayerNorm,
                      L.attention.self.num_attention_heads) for L in enc.encoder.layer)
            self.positions = PositionIds(e.position_ids.shape[1], e.padding_idx if mt == "roberta" else None)
            if mt == "bert":
                self.pooler, self.classifier = enc.pooler.dense, hf_model.classifier
            else:
                self.pooler, self.classifier = hf_model.classifier.dense, hf_model.classifier.out_proj
        else:  # distilbert
            enc = hf_model.distilbert
            e = enc.embeddings
            self.word, self.pos, self.tok_type, self.ln = e.word_embeddings, e.position_embeddings, None, e.LayerNorm
            self.positions = PositionIds(e.position_ids.shape[1])
            self.blocks = nn.ModuleList(
                Block(L.attention.q_lin, L.attention.k_lin, L.attention.v_lin, L.attention.out_lin,
                      L.sa_layer_norm, L.ffn.lin1, L.ffn.activation, L.ffn.lin2, L.output_layer_norm,
                      L.attention.n_heads) for L in enc.transformer.layer)
            self.pooler, self.classifier = hf_model.pre_classifier, hf_model.classifier

        self.emb_sum, self.emb_sum2 = ResidualSum(), ResidualSum()  # the embedding sums feed LayerNorm too

    def forward(self, input_ids, attention_bias):
        x = self.word(input_ids)
        if self.tok_type is not None:  # segment 0 everywhere (single-sentence classification)
            x = self.emb_sum(x, self.tok_type(torch.zeros_like(input_ids)))
        x = self.ln(self.emb_sum2(x, self.pos(self.positions(input_ids))))
        for blk in self.blocks:
            x = blk(x, attention_bias)
        h = self.pooler(x[:, 0])
        h = torch.relu(h) if self.family == "distilbert" else torch.tanh(h)
        return self.classifier(h)


class HFLogits(nn.Module):
    """The Hugging Face classifier behind the split's inputs, ``(input_ids, attention_bias) -> logits``, dropout
    included: the float fine-tune trains the HF model (whose modules the split shares) in the runner's loop."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, attention_bias):
        mask = (attention_bias[:, 0, 0, :] == 0).long()  # the 0/1 mask the bias was made from
        return self.hf(input_ids=input_ids, attention_mask=mask).logits


def prepare_config() -> dict:
    """prepare_by_platform's custom config for the split: the float leaves named above."""
    return {"leaf_module": [MaskedSoftmax, PositionIds, ResidualSum]}


def count_targets(model: nn.Module) -> tuple[int, int]:
    """(nn.Linear layers, attention matmuls) the split holds: every one must end up quantized."""
    linears = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    return linears, 2 * len(model.blocks)
