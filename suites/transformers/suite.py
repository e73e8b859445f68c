"""The transformers suite: Hugging Face encoder classifiers (BERT, DistilBERT, RoBERTa, MiniLM; model.py loads them
with checks and splits them so tokenization and the attention mask run outside the traced part), its data (the
embedded Jane Austen task or --data text files; data.py), its metric (accuracy and macro-F1, in PyTorch and, through
the real tokenizer, in onnxruntime; evaluate.py) and its recipes. The pipeline is the runner's
(suites/common/runner.py); what the suite adds to it:

* float fine-tune (``float_finetune``): the HF model itself, dropout on, AdamW with a 10 % warm-up + cosine, the
  gradient clipped at 1.0, over the whole training set; also with ``--data`` (``check`` resolves
  ``finetune_float``: a hub model comes with a new head). The runner caches the result.
* QAT optimizer (``make_training``): AdamW, the quantizers' scales / zero points at ``--qparam-lr``, 10 % warm-up +
  cosine; ``--qat-steps N`` is ``--train-images`` N x batch.
* after each export (``on_stage_end(run, "export", ...)``): once per run the float split as fp32 ONNX
  (``<arch>_fp32.onnx``) and the fine-tuned float model as a Hugging Face folder (``<arch>_float_hf/``: save_pretrained's config and safetensors
  weights, the tokenizer files, the label names); then the fp32-vs-int8 latency in onnxruntime (``extras.ort_latency``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil

import numpy as np
import torch
import torch.utils.data

from suites.common.distributed import say
from suites.common.subsets import val_subset
from suites.common.suite import Data, Metric, Suite, SuiteError
from suites.transformers import data as D
from suites.transformers.evaluate import ort_latency, score_onnx, scores
from suites.transformers.model import (EncoderClassifier, HFLogits, ModelError, attention_bias, count_targets,
                                       load_model, load_tokenizer, positions)
from suites.transformers.model import prepare_config as split_config

from suites.transformers.recipe import EMBEDDED, EMBEDDED_MODEL, GENERAL, SMOKE  # noqa: F401 (the recipes)


def warmup_steps(steps: int) -> int:
    """10 % linear warm-up (at least one step) before the cosine, float fine-tune and QAT alike."""
    return max(1, steps // 10)


def check_resume(args) -> dict:
    """--resume first of all (before the data, the model and calibration): readable with torch.load(weights_only=True)
    (missing, empty, truncated: named), a QAT checkpoint of this suite's encoder split, of the run's backend. Returns
    what the later checks need: the checkpoint's labels and tensor shapes."""
    from suites.common.checkpoints import read_qat_checkpoint
    ck = read_qat_checkpoint(args.resume, "--resume", ModelError,
                             "it is written by this suite as <output-dir>/transformers/<arch>_checkpoint.pth")
    sd = ck["state_dict"]
    if "word.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise ModelError(f"--resume '{args.resume}' is not a checkpoint of this suite's encoder split (no "
                         f"'word.weight' / 'blocks.N...' tensors; it has e.g. {list(sd)[:3]}): another model's "
                         "checkpoint")
    if ck.get("backend") and ck["backend"] != args.backend:
        raise ModelError(f"--resume '{args.resume}' was trained with --backend {ck['backend']}, this run uses "
                         f"--backend {args.backend}; pass --backend {ck['backend']}")
    return {"labels": ck.get("labels"),
            "shapes": {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}}


def check_resume_fits(info: dict, hf, names, path: str) -> None:
    """The --resume checkpoint against the data's labels and the loaded model (cheap: the split wraps the model's
    own modules), before the float stage and calibration."""
    if info.get("labels") is not None and list(info["labels"]) != list(names):
        raise ModelError(f"--resume '{path}' was trained on the labels {list(info['labels'])[:8]}, the data has "
                         f"{list(names)[:8]}")
    if hf is None:
        return
    shapes, own = info["shapes"], EncoderClassifier(hf).state_dict()
    missing = [k for k in own if k not in shapes]
    wrong = [f"{k}: {shapes[k]} in the file, {tuple(v.shape)} in the model" for k, v in own.items()
             if k in shapes and shapes[k] != tuple(v.shape)]
    if missing or wrong:
        raise ModelError(f"--resume '{path}' does not fit the model (another model's checkpoint?): "
                         + "; ".join(wrong[:3] + ([f"{len(missing)} tensors missing, e.g. {missing[:3]}"]
                                                  if missing else [])))


def collate(samples):
    """A batch as the split model reads it: ((input_ids, attention bias) trimmed to the batch's longest example,
    the labels)."""
    ids, mask, labels = torch.utils.data.default_collate(samples)
    ids, mask = D.trim_batch(ids, mask)
    return (ids, attention_bias(mask)), labels


def model_arch(model: str | None) -> str:
    """``minilm`` for the embedded model, else the model's folder / hub name, file-name safe."""
    if not model:
        return "minilm"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(model))) or "encoder"


class TransformersSuite(Suite):
    name = "transformers"
    metric = Metric("accuracy", "higher", ".2f")  # test-set accuracy (%); the scores add macro-F1
    summary = "accuracy {accuracy:.2f} macro-F1 {macro_f1:.2f}"
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
    smoke = SMOKE
    errors = (D.DataError, ModelError)
    train_meters = (("Acc", ":6.2f"),)
    channels_last = False
    collate = staticmethod(collate)
    cache_tag = "text"
    prepare_custom = split_config()
    export_options = {"input_names": ["input_ids", "attention_bias"], "output_names": ["logits"]}

    def __init__(self):
        self.hf = None  # the student's Hugging Face model: the split shares its modules (float fine-tune, save)
        self.tok, self.config, self.names, self.model_dir = None, None, [], None
        self.resume_info, self.float_files = None, None

    # ---- command line and recipe
    def add_arguments(self, p) -> None:
        p.add_argument("--model", default=None,
                       help=f"model folder or hub name (default: {EMBEDDED_MODEL}, installed offline)")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder / hub name (default: the model's)")
        p.add_argument("--max-length", type=int, default=None, help="tokens per example (128; embedded 96)")
        p.add_argument("--passage-lines", type=int, default=None, help="embedded: lines per passage (5)")
        p.add_argument("--train-per-class", type=int, default=None,
                       help="at most this many training examples per class (embedded 600; default: all)")
        p.add_argument("--test-per-class", type=int, default=None,
                       help="at most this many test examples per class (default: all; 2 344 embedded)")
        p.add_argument("--qat-steps", type=int, default=None,
                       help="QAT steps per epoch: --train-images N x --batch-size (embedded 40; default: the whole "
                            "training set)")
        p.add_argument("--onnx-length", type=int, default=128, help="sequence length baked into the ONNX files")
        p.add_argument("--latency-repeats", type=int, default=20, help="runs of the fp32-vs-int8 latency median")

    def recipe(self, flags) -> dict:
        return {**super().recipe(flags), "arch": model_arch(flags.model)}

    def check(self, flags) -> dict:
        for flag, v in (("--onnx-length", flags.onnx_length), ("--latency-repeats", flags.latency_repeats),
                        ("--qat-steps", flags.qat_steps), ("--passage-lines", flags.passage_lines),
                        ("--train-per-class", flags.train_per_class), ("--test-per-class", flags.test_per_class)):
            if v is not None and v < 1:
                raise SuiteError(f"{flag} {v} must be >= 1")
        if flags.onnx_length < flags.max_length:
            raise ModelError(f"--onnx-length {flags.onnx_length} is shorter than --max-length {flags.max_length}; "
                             f"give --onnx-length >= {flags.max_length}")
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_warning()  # the runner sets the logger of the suite's name, here also HF's, to INFO
        hf_logging.disable_progress_bar()  # weight loading / writing bars between the log lines
        self.resume_info = check_resume(flags) if flags.resume else None
        resolved = {"pretrained": flags.pretrained or not flags.model_path,  # --model's own weights are the start
                    # a hub model comes with a new head: fine-tuned with --data too
                    "finetune_float": not flags.model_path and flags.float_epochs > 0}
        if flags.qat_steps and flags.train_images is None:
            resolved["train_images"] = flags.qat_steps * flags.batch_size
        return resolved

    # ---- data and model
    def datasets(self, cfg) -> Data:
        train, test, self.names = D.load_examples(cfg)  # bad data fails before the model loads
        if self.resume_info:
            check_resume_fits(self.resume_info, None, self.names, cfg.resume)
        self.model_dir = cfg.model
        if self.model_dir is None:
            from suites.common.assets import MINILM_L6
            self.model_dir = MINILM_L6.fetch()
        self.tok, self.config = load_tokenizer(self.model_dir, cfg.max_length, cfg.tokenizer)
        if cfg.onnx_length > positions(self.config):  # else the first export fails, after training
            raise ModelError(f"--onnx-length {cfg.onnx_length} is beyond the model's position embeddings "
                             f"({positions(self.config)} positions); use --onnx-length <= {positions(self.config)}")
        digest = hashlib.sha256(json.dumps([t[:2] for t in train]).encode()).hexdigest()
        tr, te = D.Encoded(train, self.tok, cfg.max_length), D.Encoded(test, self.tok, cfg.max_length)
        te = val_subset(te, cfg.val_images, cfg.seed)
        say(f"=> {len(train)} training / {len(te)} test examples, {len(self.names)} labels, max length "
            f"{cfg.max_length}")
        example = (torch.full((1, cfg.onnx_length), 1000, dtype=torch.long),
                   attention_bias(torch.ones(1, cfg.onnx_length, dtype=torch.long)))
        facts = {"model": cfg.model or f"{EMBEDDED_MODEL} (embedded)", "max_length": cfg.max_length,
                 "labels": self.names, "train_examples": len(tr), "test_examples": len(te), "split": {}}
        key = {"model": cfg.model or EMBEDDED_MODEL, "tokenizer": cfg.tokenizer, "max_length": cfg.max_length,
               "train": digest, "optim": cfg.optim, "weight_decay": cfg.weight_decay,
               "clip_grad_norm": cfg.clip_grad_norm, "finetune": "hf-warmup-cosine"}
        return Data(tr, tr, te, name="Jane Austen's novels" if cfg.embedded else cfg.data, example=example,
                    facts=facts, checkpoint={"labels": self.names}, cache_key=key)

    def build_model(self, cfg, arch: str, pretrained: bool):
        hf = load_model(self.model_dir, copy.deepcopy(self.config), len(self.names), weights=pretrained)
        if self.hf is None:  # the student (built first); a --teacher-path teacher is built after it
            if self.resume_info:
                check_resume_fits(self.resume_info, hf, self.names, cfg.resume)
            self.hf = hf
        return EncoderClassifier(hf).eval()

    # ---- training
    def float_finetune(self, model, train_ds, run) -> None:
        """The HF model with its dropout (``model``, the split, shares its modules) through the runner's training
        loop: AdamW at --float-lr, 10 % warm-up + cosine, --clip-grad-norm; batches drawn by a sampler seeded with
        --seed over the whole training set (--float-images: the first N of each pass)."""
        from suites.common.training import Training, cosine_schedule, loader, make_optimizer, train_epoch
        cfg = run.config
        net = HFLogits(self.hf).to(run.device)
        n = min(cfg.float_images or len(train_ds), len(train_ds))
        sampler = torch.utils.data.RandomSampler(train_ds, num_samples=n,
                                                 generator=torch.Generator().manual_seed(cfg.seed))
        dl = loader(train_ds, cfg.batch_size, cfg.workers, sampler=sampler, collate_fn=collate)
        opt = make_optimizer(net.parameters(), cfg.optim, cfg.float_lr, cfg.momentum, cfg.weight_decay)
        steps = len(dl) * cfg.float_epochs
        sched = cosine_schedule(opt, steps, warmup_steps(steps))
        for ep in range(cfg.float_epochs):
            train_epoch(run, dl, net, Training(opt, sched, prefix="Float"), ep)

    def make_training(self, model, steps_per_epoch: int, cfg):
        from suites.common.training import cosine_schedule, make_optimizer, qat_param_groups
        opt = make_optimizer(qat_param_groups(model, cfg.lr, cfg.qparam_lr), cfg.optim, cfg.lr, cfg.momentum,
                             cfg.weight_decay)
        steps = steps_per_epoch * cfg.epochs
        return opt, cosine_schedule(opt, steps, cfg.warmup_steps or warmup_steps(steps))

    # ---- metric
    @torch.no_grad()
    def evaluate(self, model, loader, run, prefix: str) -> dict:
        from suites.common.training import batch_inputs
        model.eval()
        preds, ys = [], []
        for batch in loader:
            x, y = batch_inputs(batch, run.device)
            preds.append(model(*x).argmax(1).cpu().numpy())
            ys.append(y.cpu().numpy())
        return scores(np.concatenate(preds), np.concatenate(ys), len(self.names))

    def evaluate_onnx(self, session, loader, run, prefix: str) -> dict:
        """The test texts through the tokenizer, then the exported file: what a deployment runs."""
        ds = loader.dataset
        if isinstance(ds, torch.utils.data.Subset):
            examples = [ds.dataset.examples[i] for i in ds.indices]
        else:
            examples = ds.examples
        return score_onnx(session, self.tok, examples, len(self.names), run.config.max_length)

    # ---- events
    def on_stage_end(self, run, stage: str, result) -> None:
        if stage == "float_model":
            run.metrics.extras["split"].update(zip(("linear", "attention_matmuls"), count_targets(result)))
        elif stage == "export":
            self.float_twin(run)
            self.latency(run, result.onnx_path)

    def float_twin(self, run) -> None:
        """Once per run (the float model does not change): the float split as fp32 ONNX (``<arch>_fp32.onnx``) and
        the float model as a Hugging Face folder (``<arch>_float_hf/``)."""
        cfg = run.config
        if self.float_files is None:
            base = os.path.join(cfg.out_dir, cfg.arch)
            self.float_files = {"fp32_onnx": base + "_fp32.onnx", "float_hf": base + "_float_hf"}
            dummy = tuple(t.expand(cfg.onnx_batch, *t.shape[1:]).contiguous() for t in run.data.example)
            with torch.no_grad():
                torch.onnx.export(copy.deepcopy(EncoderClassifier(self.hf)).cpu().eval(), dummy,
                                  self.float_files["fp32_onnx"], opset_version=cfg.opset_version, dynamo=True,
                                  external_data=False, verbose=False, **self.export_options)
            self.save_pretrained(self.float_files["float_hf"])
            say(f"=> float model: {self.float_files['fp32_onnx']} (split, fp32 ONNX), {self.float_files['float_hf']}"
                " (Hugging Face save_pretrained + tokenizer)")
        run.metrics.files.update(self.float_files)

    def latency(self, run, int8_path: str) -> None:
        """The fp32-vs-int8 latency in onnxruntime (``extras.ort_latency``)."""
        from suites.common.cli import threads
        cfg, m = run.config, run.metrics
        with m.timed("latency"):
            lat = ort_latency({"fp32_ms": self.float_files["fp32_onnx"], "int8_ms": int8_path},
                              cfg.onnx_batch, cfg.onnx_length, threads(cfg) or None, cfg.latency_repeats)
        lat.update(batch=cfg.onnx_batch, length=cfg.onnx_length, threads=threads(cfg) or torch.get_num_threads(),
                   int8_over_fp32=round(lat["int8_ms"] / lat["fp32_ms"], 3))
        m.extras["ort_latency"] = lat
        say(f"=> ORT latency b{cfg.onnx_batch} len{cfg.onnx_length}: fp32 {lat['fp32_ms']} ms, int8 "
            f"{lat['int8_ms']} ms ({lat['int8_over_fp32']}x)")

    def save_pretrained(self, folder: str) -> None:
        """The float HF model (config with the label names, safetensors weights) and its tokenizer, loadable with
        AutoModelForSequenceClassification / AutoTokenizer.from_pretrained(folder); replaced whole."""
        self.hf.config.id2label = dict(enumerate(self.names))
        self.hf.config.label2id = {n: i for i, n in enumerate(self.names)}
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.hf.save_pretrained(tmp)
        self.tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)


SUITE = TransformersSuite()
