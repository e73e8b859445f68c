#!/usr/bin/env python3
"""Start a new suite from the smallest working suite of its family.

    python tools/new_suite.py NAME [--from classifier|yolov5|transformers|segmentation|imagenet] [--root REPO]

``--from classifier`` (the default) starts from tools/templates/classifier/: a torchvision classifier on an
ImageFolder with an embedded default, one suite.py of under 100 lines (model, data, metric, recipe), its main.py shim,
regression.json, baselines.json, README.md and tests/. The other families start from their suite: ``suites/<from>/``
and ``tests/suites/<from>/``. The pipeline (suites/common/) is not copied, and neither are nox sessions: the root
noxfile makes NAME_float_eval, NAME_qat, NAME_export and NAME_regression from NAME's regression.json. The copy goes
to ``suites/NAME/`` and ``tests/suites/NAME/``. What names the suite is renamed, prose is not:

    suites.<from>, suites/<from>          module and file paths                    -> suites.NAME, suites/NAME
    "<from>"                              the suite's name (Suite.name: outputs in  -> "NAME"
                                          <output-dir>/NAME/, cache, logger, tests)
    <from>_qat, <from>_export, ...        nox sessions                             -> NAME_qat, NAME_export, ...
    .../<from>/...                        output paths (checkpoint/<from>/)         -> .../NAME/...
    <From>Suite                           the Suite subclass                       -> <Name>Suite
    test_<from>_suite.py ...              file names (and mentions of them)        -> test_NAME_suite.py

A file is renamed where its name holds the suite's name as a word (test_yolov5_suite.py), not inside another
name: model configs such as models/yolov5n-v6.yaml keep theirs, and so does every mention of them. Words such as
"ImageNet weights", IMAGENET1K_V1 or ``--data /data/imagenet`` stay. The root noxfile discovers
``suites/*/regression.json`` (the sessions), pytest ``tests/suites/*`` and the regression gate the same
regression.json: the new suite's sessions, tests and regression entry run at once, under its own name, with no edits
elsewhere.
"""
from __future__ import annotations

import argparse
import keyword
import re
import shutil
import sys
from pathlib import Path

TEXT_SUFFIXES = {".py", ".md", ".json", ".yaml", ".yml", ".txt", ".cfg", ".toml"}


def camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


def renamer(old: str, new: str, old_class: str | None, files: dict[str, str]):
    """text -> text with the suite's identifiers and paths renamed (see the module docstring)."""
    o = re.escape(old)
    rules = [
        (re.compile(rf"\bsuites([./]){o}\b"), rf"suites\g<1>{new}"),
        (re.compile(rf"([\"']){o}\1"), rf"\g<1>{new}\g<1>"),
        (re.compile(rf"(?<![A-Za-z0-9_]){o}_(?=[a-z])"), f"{new}_"),
        (re.compile(rf"(?<=/){o}(?=/)"), new),
    ]
    if old_class:
        rules.append((re.compile(rf"\b{re.escape(old_class)}\b"), f"{camel(new)}Suite"))
    rules += [(re.compile(rf"\b{re.escape(a)}\b"), b) for a, b in files.items()]

    def rename(text: str) -> str:
        for pattern, repl in rules:
            text = pattern.sub(repl, text)
        return text
    return rename


TEMPLATES = Path(__file__).resolve().parent / "templates"


def sources(root: Path, src: str) -> list[tuple[Path, Path]]:
    """(folder to copy, where its copy goes) pairs of the family ``src``, the copies' places named by NAME later."""
    if (TEMPLATES / src / "suite.py").is_file():
        return [(TEMPLATES / src, root / "suites"), (TEMPLATES / src / "tests", root / "tests" / "suites")]
    suites = root / "suites"
    if not (suites / src / "suite.py").is_file():
        have = sorted({p.name for p in suites.iterdir() if (p / "suite.py").is_file()}
                      | {p.name for p in TEMPLATES.iterdir() if (p / "suite.py").is_file()})
        raise SystemExit(f"no suite or template '{src}' (a suites/<name>/suite.py or tools/templates/<name>/); "
                         f"families: {have}")
    return [(suites / src, suites), (root / "tests" / "suites" / src, root / "tests" / "suites")]


def copy_suite(root: Path, src: str, name: str) -> list[Path]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise SystemExit(f"suite name must be a lowercase Python identifier (e.g. lite0), got {name!r}")
    pairs = [(s, d / name) for s, d in sources(root, src)]
    for _s, d in pairs:
        if d.exists():
            raise SystemExit(f"{d} exists already: pick another name or remove it")
    m = re.search(r"^class (\w+)\(Suite\)", (pairs[0][0] / "suite.py").read_text(), re.M)
    word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(src)}(?![A-Za-z0-9-])")  # the name as a word of a file name
    files = {p.name: word.sub(name, p.name) for s, _d in pairs if s.is_dir() for p in s.rglob("*")
             if word.search(p.name) and p.is_file()}
    rename = renamer(src, name, m.group(1) if m else None, {Path(a).stem: Path(b).stem for a, b in files.items()})
    made = []
    for s, d in pairs:
        if not s.is_dir():
            continue
        shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "checkpoint", "runs",
                                                            *(["tests"] if s.parent == TEMPLATES else [])))
        for f in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
            if f.is_file() and f.suffix in TEXT_SUFFIXES:
                f.write_text(rename(f.read_text()))
            if word.search(f.name):
                f.rename(f.with_name(word.sub(name, f.name)))
        made.append(d)
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--from", dest="src", default="classifier",
                    help="the family: classifier (the minimal template), or a suite: yolov5, transformers, "
                         "segmentation, imagenet")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    a = ap.parse_args(argv)
    for d in copy_suite(Path(a.root), a.src, a.name):
        print(f"created {d}")
    print(f"next (suites/README.md, 'Start a suite for your model'): edit suites/{a.name}/suite.py (model, recipe, "
          f"metric), data.py, baselines.json, README.md; run python3 -m nox -s {a.name}_qat -- --smoke")
    return 0


if __name__ == "__main__":
    sys.exit(main())
