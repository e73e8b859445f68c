"""Text-classification data: the embedded Jane Austen default and user data (--data).

Embedded default: the six novels of the Debian package r-cran-janeaustenr (R data, parsed by rdata.py).
Each novel is cut at its CHAPTER headings; passages are ``passage_lines`` consecutive non-empty lines of
one chapter. Chapters (not passages) are split between train and test, so a test passage never neighbours
a training passage. Label = which novel.

User data (--data DIR): ``train.jsonl`` and ``test.jsonl`` (or ``.tsv`` with ``text<TAB>label``), one
example per line, ``{"text": ..., "label": ...}``; labels are strings or integers.
"""
from __future__ import annotations

import json
import os
import random
import re

import torch

NOVELS = {  # R object name in the package -> label name (the order is the label index)
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility",
}
CHAPTER_RE = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlcdm]+)\.?\s*$", re.IGNORECASE)
VOLUME_RE = re.compile(r"^\s*volume\s+([0-9]+|[ivxlcdm]+)\.?\s*$", re.IGNORECASE)


class DataError(ValueError):
    """Empty, unlabeled or malformed data: reported before training starts."""


def load_novels(rdb: str, rdx: str) -> dict[str, list[str]]:
    """Novel name -> its lines, read from the package's R data (names taken from the .rdx index)."""
    from suites.transformers.rdata import read_rdb_object, read_rdx
    index = read_rdx(rdx)
    missing = sorted(set(NOVELS) - set(index))
    if missing:
        raise DataError(f"{rdx}: the R data index lacks {missing} (has {sorted(index)})")
    out = {}
    for name in NOVELS:
        lines = read_rdb_object(rdb, *index[name])
        if not isinstance(lines, list) or not all(x is None or isinstance(x, str) for x in lines):
            raise DataError(f"{rdb}: object '{name}' is not a character vector")
        out[name] = [x or "" for x in lines]
    return out


def chapters(lines: list[str]) -> list[list[str]]:
    """The non-empty lines of each chapter (text before the first CHAPTER heading is dropped)."""
    out: list[list[str]] = []
    for line in lines:
        if CHAPTER_RE.match(line):
            out.append([])
        elif out and line.strip() and not VOLUME_RE.match(line):
            out[-1].append(line.strip())
    return out


def passages(chapter: list[str], n_lines: int) -> list[str]:
    return [" ".join(chapter[i:i + n_lines]) for i in range(0, len(chapter) - n_lines + 1, n_lines)]


def austen_split(novels: dict[str, list[str]], n_lines: int = 5, test_fraction: float = 0.2, seed: int = 0):
    """(train, test): lists of (text, label, (novel, chapter index)). A novel's chapters are shuffled with
    ``seed`` and the first ``test_fraction`` of them (at least one) go to test."""
    train, test = [], []
    for label, name in enumerate(NOVELS):
        chs = chapters(novels[name])
        if len(chs) < 2:
            raise DataError(f"{name}: found {len(chs)} CHAPTER headings, need at least 2 for a chapter split")
        order = list(range(len(chs)))
        random.Random(f"{seed}-{name}").shuffle(order)
        n_test = max(1, round(test_fraction * len(chs)))
        test_ch = set(order[:n_test])
        for ci, ch in enumerate(chs):
            for p in passages(ch, n_lines):
                (test if ci in test_ch else train).append((p, label, (name, ci)))
    return train, test


def balanced_subset(examples: list, per_class: int | None, num_labels: int, seed: int) -> list:
    """At most ``per_class`` examples of each label (random, seeded); None keeps everything."""
    if per_class is None:
        return list(examples)
    rng = random.Random(seed)
    out = []
    for c in range(num_labels):
        ex = [e for e in examples if e[1] == c]
        rng.shuffle(ex)
        out += ex[:per_class]
    rng.shuffle(out)
    return out


def _read_file(path: str) -> list[tuple[str, object]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not JSON ({e})") from e
                if not isinstance(d, dict) or "text" not in d or d.get("label") is None:
                    raise DataError(f"{path}:{i}: unlabeled example (need \"text\" and \"label\")")
                rows.append((str(d["text"]), d["label"]))
            else:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 2 or not parts[1].strip():
                    raise DataError(f"{path}:{i}: unlabeled example (need text<TAB>label)")
                rows.append((parts[0], parts[1].strip()))
    return rows


def load_user_data(folder: str):
    """(train, test, label_names) from ``folder``/train.{jsonl,tsv} and test.{jsonl,tsv}."""
    if not os.path.isdir(folder):
        raise DataError(f"--data {folder}: no such folder")
    splits = {}
    for split in ("train", "test"):
        files = [os.path.join(folder, f"{split}.{e}") for e in ("jsonl", "tsv")]
        found = [f for f in files if os.path.exists(f)]
        if not found:
            raise DataError(f"--data {folder}: missing {split}.jsonl (or {split}.tsv)")
        splits[split] = _read_file(found[0])
        if not splits[split]:
            raise DataError(f"{found[0]}: no examples (the file is empty)")
    names = sorted({str(lab) for _, lab in splits["train"]})
    if len(names) < 2:
        raise DataError(f"--data {folder}: train has {len(names)} distinct label(s); need at least 2")
    unknown = sorted({str(lab) for _, lab in splits["test"]} - set(names))
    if unknown:
        raise DataError(f"--data {folder}: test labels {unknown[:5]} never occur in train")
    idx = {n: i for i, n in enumerate(names)}
    to = lambda rows: [(t, idx[str(lab)], None) for t, lab in rows]  # noqa: E731
    return to(splits["train"]), to(splits["test"]), names


def load_examples(args):
    """(train, test, label names) of the embedded default (``args.embedded``: the Austen chapters,
    ``--passage-lines``) or of ``--data``, sub-sampled to ``--train-per-class`` / ``--test-per-class``; DataError
    before any model work."""
    if args.embedded:
        from suites.common.assets import _JANE, JANEAUSTENR
        files = JANEAUSTENR.fetch()
        novels = load_novels(files[_JANE + "Rdata.rdb"], files[_JANE + "Rdata.rdx"])
        train, test = austen_split(novels, args.passage_lines, seed=0)
        names = list(NOVELS.values())
    else:
        train, test, names = load_user_data(args.data)
    train = balanced_subset(train, args.train_per_class, len(names), args.seed)
    test = balanced_subset(test, args.test_per_class, len(names), 0)
    if not train or not test:
        raise DataError("no training or test examples left after sub-sampling")
    return train, test, names


class Encoded(torch.utils.data.Dataset):
    """Tokenized examples (ids and 0/1 attention mask, padded to ``max_length``) with their labels; ``examples``
    keeps the texts (the ONNX evaluation tokenizes them again, as a deployment would)."""

    def __init__(self, examples: list, tokenizer, max_length: int):
        if not examples:
            raise DataError("no examples to tokenize")
        self.examples = examples
        enc = tokenizer([e[0] for e in examples], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt", return_token_type_ids=False)
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        self.labels = torch.tensor([e[1] for e in examples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.ids[i], self.mask[i], self.labels[i]


def trim_batch(ids: torch.Tensor, mask: torch.Tensor):
    """Drop the all-padding tail columns of a batch (faster training; the model output is unchanged)."""
    n = int(mask.sum(1).max())
    return ids[:, :n], mask[:, :n]
