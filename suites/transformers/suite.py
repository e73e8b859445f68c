"""The transformers suite: Hugging Face encoder classifiers (BERT, DistilBERT, RoBERTa, MiniLM; model.py loads them
with checks and splits them so tokenization and the attention mask run outside the traced part), its data (the
embedded Jane Austen task or --data text files; data.py), its metric (accuracy and macro-F1, in PyTorch and, through
the real tokenizer, in onnxruntime; evaluate.py) and its recipes. The pipeline is the runner's
(suites/common/runner.py); what the suite adds to it:

* float fine-tune (``float_finetune``): the HF model itself, dropout on, AdamW with a 10 % warm-up + cosine, the
  gradient clipped at 1.0, over the whole training set; also with ``--data`` (``finetunes_float``: a hub model comes
  with a new head). The runner caches the result.
* QAT optimizer (``make_training``): AdamW, the quantizers' scales / zero points at ``--qparam-lr``, 10 % warm-up +
  cosine; ``--qat-steps N`` is ``--train-images`` N x batch.
* after each export (``after_export``): once per run the float split as fp32 ONNX (``<arch>_fp32.onnx``) and the
  fine-tuned float model as a Hugging Face folder (``<arch>_float_hf/``: save_pretrained's config and safetensors
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

EMBEDDED = dict(
    passage_lines=5, max_length=96, train_per_class=600, test_per_class=None,
    # float fine-tune of MiniLM with its new head (cached): one pass over the 3 600 training passages
    float_epochs=1, float_lr=2e-4,
    # QAT: 40 steps of 32, kd from the float model
    epochs=1, qat_steps=40, batch_size=32, lr=1e-5, optim="adamw", weight_decay=0.0, clip_grad_norm=1.0,
    backend="ONNXRuntime", calib_batches=8, distill_method="kd", distill_alpha=0.9, temperature=2.0,
    print_freq=10, workers=0, val_batch_size=64, onnx_batch=8,
)
GENERAL = dict(EMBEDDED, passage_lines=None, max_length=128, train_per_class=None, float_epochs=0, float_lr=2e-5,
               qat_steps=None, lr=2e-5, calib_batches=16, print_freq=50)
SMOKE = dict(train_per_class=8, test_per_class=4, qat_steps=2, calib_batches=1, batch_size=8, float_images=16,
             latency_repeats=2, print_freq=1)
EMBEDDED_MODEL = "all-MiniLM-L6-v2"


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


class TransformersSuite(Suite):
    name = "transformers"
    metric = Metric("accuracy", "higher", ".2f")  # test-set accuracy (%); the scores add macro-F1
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
    errors = (D.DataError, ModelError)
    train_meters = (("Acc", ":6.2f"),)
    channels_last = False
    cache_tag = "text"

    def __init__(self):
        self.hf = None  # the student's Hugging Face model: the split shares its modules (float fine-tune, save)
        self.tok, self.config, self.names, self.split = None, None, [], {}
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

    def smoke(self, args) -> dict:
        return dict(SMOKE)

    def check_args(self, args) -> None:
        for flag, v in (("--onnx-length", args.onnx_length), ("--latency-repeats", args.latency_repeats),
                        ("--qat-steps", args.qat_steps), ("--passage-lines", args.passage_lines),
                        ("--train-per-class", args.train_per_class), ("--test-per-class", args.test_per_class)):
            if v is not None and v < 1:
                raise SuiteError(f"{flag} {v} must be >= 1")
        if args.onnx_length < args.max_length:
            raise ModelError(f"--onnx-length {args.onnx_length} is shorter than --max-length {args.max_length}; "
                             f"give --onnx-length >= {args.max_length}")
        if args.qat_steps and args.train_images is None:
            args.train_images = args.qat_steps * args.batch_size
        if not args.model_path:
            args.pretrained = True  # --model's own weights are the start (--model-path replaces them)

    def arch(self, args) -> str:
        """``minilm`` for the embedded model, else the model's folder / hub name, file-name safe."""
        if not args.model:
            return "minilm"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(args.model))) or "encoder"

    # ---- checks, data
    def check(self, args) -> None:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_warning()  # the runner sets the logger of the suite's name, here also HF's, to INFO
        hf_logging.disable_progress_bar()  # weight loading / writing bars between the log lines
        self.resume_info = check_resume(args) if args.resume else None

    def datasets(self, args) -> Data:
        self.hf, self.float_files, self.split = None, None, {}
        train, test, self.names = D.load_examples(args)  # bad data fails before the model loads
        if self.resume_info:
            check_resume_fits(self.resume_info, None, self.names, args.resume)
        self.model_dir = args.model
        if self.model_dir is None:
            from suites.common.assets import MINILM_L6
            self.model_dir = MINILM_L6.fetch()
        self.tok, self.config = load_tokenizer(self.model_dir, args.max_length, args.tokenizer)
        if args.onnx_length > positions(self.config):  # else the first export fails, after training
            raise ModelError(f"--onnx-length {args.onnx_length} is beyond the model's position embeddings "
                             f"({positions(self.config)} positions); use --onnx-length <= {positions(self.config)}")
        self.train_digest = hashlib.sha256(json.dumps([t[:2] for t in train]).encode()).hexdigest()
        tr, te = D.Encoded(train, self.tok, args.max_length), D.Encoded(test, self.tok, args.max_length)
        te = val_subset(te, args.val_images, args.seed)
        say(f"=> {len(train)} training / {len(te)} test examples, {len(self.names)} labels, max length "
            f"{args.max_length}")
        return Data(tr, tr, te, name="Jane Austen's novels" if args.embedded else args.data)

    def extras(self, args, data: Data) -> dict:
        # "split" is filled when the model is built
        return {"model": args.model or f"{EMBEDDED_MODEL} (embedded)", "max_length": args.max_length,
                "labels": self.names, "train_examples": len(data.train), "test_examples": len(data.val),
                "split": self.split}

    def cache_key(self, args) -> dict:
        return {"model": args.model or EMBEDDED_MODEL, "tokenizer": args.tokenizer, "max_length": args.max_length,
                "train": self.train_digest, "optim": args.optim, "weight_decay": args.weight_decay,
                "clip_grad_norm": args.clip_grad_norm, "finetune": "hf-warmup-cosine"}

    def checkpoint_extras(self, args) -> dict:
        return {"labels": self.names}

    # ---- model
    def build_model(self, args, arch: str, pretrained: bool):
        hf = load_model(self.model_dir, copy.deepcopy(self.config), len(self.names), weights=pretrained)
        split = EncoderClassifier(hf).eval()
        if self.hf is None:  # the student (built first); a --teacher-path teacher is built after it
            if self.resume_info:
                check_resume_fits(self.resume_info, hf, self.names, args.resume)
            self.hf = hf
            self.split.update(zip(("linear", "attention_matmuls"), count_targets(split)))
        return split

    def prepare_config(self, model, args) -> dict:
        return split_config()

    def finetunes_float(self, args) -> bool:
        return not args.model_path and args.float_epochs > 0

    def float_finetune(self, model, train_ds, args) -> None:
        """The HF model with its dropout (``model``, the split, shares its modules) through the runner's training
        loop: AdamW at --float-lr, 10 % warm-up + cosine, --clip-grad-norm; batches drawn by a sampler seeded with
        --seed over the whole training set (--float-images: the first N of each pass)."""
        from suites.common.training import cosine_schedule, loader, make_optimizer, train_epoch
        net = HFLogits(self.hf).to(args.device)
        n = min(args.float_images or len(train_ds), len(train_ds))
        sampler = torch.utils.data.RandomSampler(train_ds, num_samples=n,
                                                 generator=torch.Generator().manual_seed(args.seed))
        dl = loader(train_ds, args.batch_size, args.workers, sampler=sampler)
        opt = make_optimizer(net.parameters(), args.optim, args.float_lr, args.momentum, args.weight_decay)
        steps = len(dl) * args.float_epochs
        sched = cosine_schedule(opt, steps, warmup_steps(steps))
        for ep in range(args.float_epochs):
            train_epoch(self, dl, net, opt, sched, ep, args, prefix="Float")

    def make_training(self, model, steps_per_epoch: int, args):
        from suites.common.training import cosine_schedule, make_optimizer, qat_param_groups
        opt = make_optimizer(qat_param_groups(model, args.lr, args.qparam_lr), args.optim, args.lr, args.momentum,
                             args.weight_decay)
        steps = steps_per_epoch * args.epochs
        return opt, cosine_schedule(opt, steps, args.warmup_steps or warmup_steps(steps))

    # ---- batches and metric
    def inputs(self, batch, device, memory_format=torch.contiguous_format):
        """(input_ids, attention bias) trimmed to the batch's longest example, and the labels."""
        ids, mask = D.trim_batch(batch[0], batch[1])
        return (ids.to(device), attention_bias(mask).to(device)), batch[2].to(device)

    def train_scores(self, output, target) -> tuple[float, ...]:
        return (100.0 * float((output.argmax(1) == target).float().mean()),)

    def describe(self, s: dict) -> str:
        return f"accuracy {s['accuracy']:.2f} macro-F1 {s['macro_f1']:.2f}"

    @torch.no_grad()
    def evaluate(self, model, loader, args, prefix: str) -> dict:
        model.eval()
        preds, ys = [], []
        for batch in loader:
            x, y = self.inputs(batch, args.device)
            preds.append(model(*x).argmax(1).cpu().numpy())
            ys.append(y.cpu().numpy())
        return scores(np.concatenate(preds), np.concatenate(ys), len(self.names))

    def evaluate_onnx(self, session, loader, args, prefix: str) -> dict:
        """The test texts through the tokenizer, then the exported file: what a deployment runs."""
        ds = loader.dataset
        if isinstance(ds, torch.utils.data.Subset):
            examples = [ds.dataset.examples[i] for i in ds.indices]
        else:
            examples = ds.examples
        return score_onnx(session, self.tok, examples, len(self.names), args.max_length)

    # ---- export
    def dummy_input(self, args):
        ids = torch.full((1, args.onnx_length), 1000, dtype=torch.long)
        return ids, attention_bias(torch.ones(1, args.onnx_length, dtype=torch.long))

    def export_options(self, args) -> dict:
        return {"input_names": ["input_ids", "attention_bias"], "output_names": ["logits"]}

    def after_export(self, result, args, m) -> None:
        from suites.common.cli import threads
        base = os.path.join(args.out_dir, args.arch)
        if self.float_files is None:  # the float model does not change during the run: written once
            self.float_files = {"fp32_onnx": base + "_fp32.onnx", "float_hf": base + "_float_hf"}
            dummy = tuple(t.expand(args.onnx_batch, *t.shape[1:]).contiguous() for t in self.dummy_input(args))
            with torch.no_grad():
                torch.onnx.export(copy.deepcopy(EncoderClassifier(self.hf)).cpu().eval(), dummy,
                                  self.float_files["fp32_onnx"], opset_version=args.opset_version, dynamo=True,
                                  external_data=False, verbose=False, **self.export_options(args))
            self.save_pretrained(self.float_files["float_hf"])
            say(f"=> float model: {self.float_files['fp32_onnx']} (split, fp32 ONNX), {self.float_files['float_hf']}"
                " (Hugging Face save_pretrained + tokenizer)")
        m.files.update(self.float_files)
        with m.timed("latency"):
            lat = ort_latency({"fp32_ms": self.float_files["fp32_onnx"], "int8_ms": result.onnx_path},
                              args.onnx_batch, args.onnx_length, threads(args) or None, args.latency_repeats)
        lat.update(batch=args.onnx_batch, length=args.onnx_length, threads=threads(args) or torch.get_num_threads(),
                   int8_over_fp32=round(lat["int8_ms"] / lat["fp32_ms"], 3))
        m.extras["ort_latency"] = lat
        say(f"=> ORT latency b{args.onnx_batch} len{args.onnx_length}: fp32 {lat['fp32_ms']} ms, int8 "
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
