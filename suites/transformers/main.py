#!/usr/bin/env python
"""Quantization-aware training of Hugging Face encoder classifiers (BERT, DistilBERT, RoBERTa, MiniLM).

    python suites/transformers/main.py                    # embedded default (README.md): MiniLM-L6 on Austen
    python suites/transformers/main.py --model DIR_OR_HUB_NAME --data DIR --max-length 128
    torchrun --nproc_per_node 2 suites/transformers/main.py ...

Pipeline: float fine-tune (cached) -> float eval -> calibration -> QAT (kd from the float model) -> QDQ
ONNX export of the traced part -> int8 evaluation in onnxruntime -> ORT latency int8 vs fp32. Tokenization
and the attention mask run outside the traced part (model.py says why). One metrics JSON.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub name loads from the local HF cache unless told otherwise

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from suites.transformers.data import DataError  # noqa: E402
from suites.transformers.model import ModelError  # noqa: E402
from suites.common.metrics import RunMetrics  # noqa: E402
from suites.common.suite import Metric  # noqa: E402
from suites.transformers.train import is_main, say  # noqa: E402

logger = logging.getLogger("transformers_suite")

EMBEDDED = dict(passage_lines=5, max_length=96, train_per_class=600, test_per_class=None,
                float_epochs=1, float_lr=2e-4, epochs=1, qat_steps=40, batch_size=32, lr=1e-5, optim="adamw",
                backend="ONNXRuntime", calib_batches=8, distill_method="kd", print_freq=10)
GENERAL = dict(passage_lines=None, max_length=128, train_per_class=None, test_per_class=None,
               float_epochs=0, float_lr=2e-5, epochs=1, qat_steps=None, batch_size=32, lr=2e-5, optim="adamw",
               backend="ONNXRuntime", calib_batches=16, distill_method="kd", print_freq=50)
BAD_INPUT = (DataError, ModelError)
METRIC = Metric("accuracy", "higher", ".2f")  # test-set accuracy (%); scores add macro-F1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ts_qat_pytorch QAT of BERT-family encoder classifiers",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or hub name (default: embedded MiniLM-L6)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / hub name (default: the model's)")
    p.add_argument("--data", default=None, help="folder with train/test .jsonl or .tsv (default: Jane Austen)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (64 embedded, 128 --data)")
    p.add_argument("--epochs", type=int, default=None, help="QAT epochs (1)")
    p.add_argument("--qat-steps", type=int, default=None, help="at most this many QAT steps per epoch (embedded 40)")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="batch size over all processes (32)")
    p.add_argument("--lr", type=float, default=None, help="QAT learning rate (2e-5)")
    p.add_argument("--qparam-lr", type=float, default=None,
                   help="learning rate of the quantizers' scales / zero points (default: --lr; 1e-3 measured worse "
                        "on the embedded default)")
    p.add_argument("--wd", "--weight-decay", type=float, default=0.0, dest="weight_decay")
    p.add_argument("--optim", default=None, choices=["adamw", "sgd"])
    p.add_argument("--backend", default=None, choices=["ONNXRuntime", "TSQAT", "Experimental"],
                   help="ONNXRuntime (default): 7-bit weights stored int8, fast integer kernels on AVX2 CPUs")
    p.add_argument("--not-qat", action="store_true", help="float fine-tune / evaluation only")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate and export only (no QAT training)")
    p.add_argument("--resume", default="", help="QAT checkpoint to resume (or to export with -e)")
    p.add_argument("--distill-method", default=None, choices=["kd", "none"], help="kd from the float model (kd)")
    p.add_argument("--distill-alpha", type=float, default=0.9, help="loss = alpha*KD + (1-alpha)*CE")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--opset-version", type=int, default=18)
    p.add_argument("--profile", action="store_true", help="per-layer float vs fake-quant (CSV, PNG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch / ORT threads ($TS_QAT_THREADS)")
    p.add_argument("--output-dir", default="checkpoint")
    p.add_argument("--metrics", default=None, help="metrics JSON (default <output-dir>/minilm_metrics.json)")
    p.add_argument("--baselines", default=None, help="compare with this baselines.json at the end; exit 1 on failure")
    p.add_argument("--passage-lines", type=int, default=None, help="embedded: lines per passage (4)")
    p.add_argument("--train-per-class", type=int, default=None, help="training examples per class (embedded 700)")
    p.add_argument("--test-per-class", type=int, default=None, help="at most this many test examples per class (default: every passage of the test chapters, 2 344 embedded)")
    p.add_argument("--float-epochs", type=int, default=None, help="float fine-tune epochs, cached (1; 0 = none)")
    p.add_argument("--float-lr", type=float, default=None)
    p.add_argument("--calib-batches", type=int, default=None)
    p.add_argument("--onnx-batch", type=int, default=8, help="batch baked into the ONNX (latency batch)")
    p.add_argument("--onnx-length", type=int, default=128, help="length baked into the ONNX (latency length)")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--cache-dir", default=None, help="float fine-tune cache ($TS_QAT_CACHE/transformers)")
    p.add_argument("-p", "--print-freq", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny run of the whole pipeline (tests)")
    return p


def resolve(args):
    args.embedded = args.data is None
    args.lr_given = args.lr is not None  # an explicit --lr (a --resume with another one is reported)
    for k, v in (EMBEDDED if args.embedded else GENERAL).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.distill_method == "none":
        args.distill_method = None
    if args.smoke:
        for k, v in dict(train_per_class=8, test_per_class=4, qat_steps=2, calib_batches=1, batch_size=8,
                         latency_repeats=2, print_freq=1).items():
            setattr(args, k, min(getattr(args, k) or v, v))
    args.metrics = args.metrics or os.path.join(args.output_dir, "minilm_metrics.json" if args.model is None
                                                else "encoder_metrics.json")
    if args.threads is None and os.environ.get("TS_QAT_THREADS"):
        args.threads = int(os.environ["TS_QAT_THREADS"])
    if args.batch_size < 1 or args.onnx_batch < 1:
        raise DataError("--batch-size and --onnx-batch must be >= 1")
    return args


def check_resume(args) -> dict:
    """--resume first of all (before data, model loading and calibration): the file exists, is not empty, loads
    with torch.load(weights_only=True) (the core's load_checkpoint) and is a QAT checkpoint of this suite's
    encoder split with the same backend. A --lr other than the one its optimizer and LR schedule restore is
    reported (the checkpoint's is used)."""
    from suites.common.checkpoints import read_qat_checkpoint
    from suites.common.resume import lr_change_message
    path = args.resume
    ck = read_qat_checkpoint(path, "--resume", ModelError,
                             "it is written by this script as <output-dir>/*_qat_checkpoint.pth")
    sd = ck["state_dict"]
    if "word.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise ModelError(f"--resume '{path}' is not a checkpoint of this suite's encoder split (no 'word.weight' / "
                         f"'blocks.N...' tensors; it has e.g. {list(sd)[:3]}): another model's checkpoint")
    if ck.get("backend") and args.backend and ck["backend"] != args.backend:
        raise ModelError(f"--resume '{path}' was trained with --backend {ck['backend']}, this run uses "
                         f"--backend {args.backend}; pass --backend {ck['backend']}")
    if not args.evaluate:
        msg = lr_change_message(ck, args.lr, path, args.lr_given)
        if msg and is_main():
            logger.warning(msg)
    return ck


def check_resume_fits(ck: dict, hf, names, path: str) -> None:
    """The --resume checkpoint against the loaded model (cheap: the split wraps the model's own modules) and the
    data's labels, before the float stage and calibration."""
    from suites.transformers.model import EncoderClassifier
    sd = ck["state_dict"]
    own = EncoderClassifier(hf).state_dict()
    if "labels" in ck and list(ck["labels"]) != list(names):
        raise ModelError(f"--resume '{path}' was trained on the labels {list(ck['labels'])[:8]}, the data has "
                         f"{list(names)[:8]}")
    missing = [k for k in own if k not in sd]
    wrong = [f"{k}: {tuple(sd[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or wrong:
        raise ModelError(f"--resume '{path}' does not fit the model (another model's checkpoint?): "
                         + "; ".join(wrong[:3] + ([f"{len(missing)} tensors missing, e.g. {missing[:3]}"]
                                                  if missing else [])))


def load_data(args):
    """(train, test, label names); errors before any model work."""
    from suites.transformers import data
    if args.embedded:
        from suites.common.assets import _JANE, JANEAUSTENR
        files = JANEAUSTENR.fetch()
        novels = data.load_novels(files[_JANE + "Rdata.rdb"], files[_JANE + "Rdata.rdx"])
        train, test = data.austen_split(novels, args.passage_lines, seed=0)
        names = list(data.NOVELS.values())
    else:
        train, test, names = data.load_user_data(args.data)
    train = data.balanced_subset(train, args.train_per_class, len(names), args.seed)
    test = data.balanced_subset(test, args.test_per_class, len(names), 0)
    if not train or not test:
        raise DataError("no training or test examples left after sub-sampling")
    return train, test, names


def loaders(train, test, tok, args):
    from suites.transformers.data import Encoded
    tr, te = Encoded(train, tok, args.max_length), Encoded(test, tok, args.max_length)
    world = dist.get_world_size() if dist.is_initialized() else 1
    sampler = (torch.utils.data.distributed.DistributedSampler(tr, seed=args.seed) if world > 1 else
               torch.utils.data.RandomSampler(tr, generator=torch.Generator().manual_seed(args.seed)))
    tl = torch.utils.data.DataLoader(tr, batch_size=max(1, args.batch_size // world), sampler=sampler)
    vl = torch.utils.data.DataLoader(te, batch_size=64)
    return tl, vl


def float_cache_path(args, model_dir: str, train) -> str:
    from suites.common.assets import cache_dir, cache_file
    key = [model_dir, args.max_length, args.float_epochs, args.float_lr, args.batch_size, args.seed,
           [t[:2] for t in train]]
    return cache_file(args.cache_dir or os.path.join(cache_dir(), "transformers"), "float", key, ext=".pt", digits=16)


def float_stage(hf, tl, args, stages, model_dir, train):
    from suites.common.training import cosine_schedule, make_optimizer
    from suites.transformers.train import hf_forward, train_epoch
    if args.float_epochs <= 0:
        return
    path = float_cache_path(args, model_dir, train)
    if os.path.exists(path) and not args.smoke:
        from ts_qat_pytorch.utils.utils import load_checkpoint
        try:  # weights_only=True: a cache file never runs pickled code
            hf.load_state_dict(load_checkpoint(path))
        except (ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise ModelError(f"the cached float fine-tune {path} cannot be used "
                             f"({(str(e).splitlines() or [''])[0][:300]}); delete it and run again (the float "
                             "fine-tune runs and re-creates it)") from e
        say(f"=> float fine-tune reused from the cache {path}")
        stages.run["float_cached"] = True
        return
    if args.evaluate and args.resume:  # the QAT checkpoint carries the weights; no fine-tune for an export
        say("=> no cached float fine-tune: float numbers are of the un-fine-tuned model (-e --resume)")
        return
    with stages.timed("float_train"):
        opt = make_optimizer(hf.parameters(), args.optim, args.float_lr, wd=args.weight_decay)
        steps = len(tl) * args.float_epochs
        sched = cosine_schedule(opt, steps, max(1, steps // 10))
        model = hf
        if dist.is_initialized():
            model = torch.nn.parallel.DistributedDataParallel(hf)
        for ep in range(args.float_epochs):
            if hasattr(tl.sampler, "set_epoch"):
                tl.sampler.set_epoch(ep)
            train_epoch(tl, hf_forward(model), model, opt, sched, ep, args, max_steps=2 if args.smoke else None,
                        prefix="Float")
    stages.run["float_cached"] = False
    if is_main() and not args.smoke:
        from ts_qat_pytorch.utils.utils import atomic_torch_save
        atomic_torch_save(hf.state_dict(), path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("torch.onnx", "onnxscript", "onnx_ir", "torch._dynamo", "torch.export", "torch.fx", "transformers",
                  "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args = resolve(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("gloo")
        return run(args)
    except BAD_INPUT as e:
        logger.error(str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> int:
    from suites.transformers import pipeline
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    stages = RunMetrics(args.metrics, "transformers", "minilm" if args.model is None else "encoder",
                        None if args.not_qat else args.backend, METRIC, log=say, argv=args.argv)
    stages.run.update(embedded=args.embedded, threads=torch.get_num_threads())
    stages.extras.update(max_length=args.max_length)
    ck = check_resume(args) if args.resume else None  # before the data, the model and calibration
    with stages.timed("setup"):
        train, test, names = load_data(args)  # bad data fails before the model loads
        model_dir = args.model
        if model_dir is None:
            from suites.common.assets import MINILM_L6
            model_dir = MINILM_L6.fetch()
        from suites.transformers.model import check_and_load
        tok, hf = check_and_load(model_dir, len(names), args.max_length, args.tokenizer)
        if ck is not None:
            check_resume_fits(ck, hf, names, args.resume)
            del ck
        if args.onnx_length < args.max_length:
            raise ModelError(f"--onnx-length {args.onnx_length} is shorter than --max-length {args.max_length}")
        tl, vl = loaders(train, test, tok, args)
    stages.run.update(dataset="Jane Austen's novels" if args.embedded else args.data, train_examples=len(train),
                      test_examples=len(test))
    stages.extras.update(model=args.model or "all-MiniLM-L6-v2 (embedded)", labels=names)
    say(f"=> {len(train)} training / {len(test)} test examples, {len(names)} labels, max length {args.max_length}")
    float_stage(hf, tl, args, stages, model_dir, train)
    return pipeline.after_float(hf, tok, tl, vl, test, names, args, stages)


if __name__ == "__main__":
    sys.exit(main())
