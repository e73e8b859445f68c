#!/usr/bin/env python3
"""Start a new suite from an existing one.

    python tools/new_suite.py NAME --from imagenet [--root REPO]

Copies the suite's own files, ``suites/<from>/`` (suite.py, data.py, main.py, sessions.py, baselines.json,
regression.json, README.md: the pipeline is suites/common/runner.py and is not copied) and ``tests/suites/<from>/``,
to ``suites/NAME/`` and ``tests/suites/NAME/``. What names the suite is renamed, prose is not:

    suites.<from>, suites/<from>          module and file paths                    -> suites.NAME, suites/NAME
    "<from>"                              the suite's name (Suite.name: outputs in  -> "NAME"
                                          <output-dir>/NAME/, cache, logger, tests)
    <from>_qat, <from>_export, ...        nox sessions                             -> NAME_qat, NAME_export, ...
    .../<from>/...                        output paths (checkpoint/<from>/)         -> .../NAME/...
    <From>Suite                           the Suite subclass                       -> <Name>Suite
    test_<from>_suite.py ...              file names (and mentions of them)        -> test_NAME_suite.py

Words such as "ImageNet weights", IMAGENET1K_V1 or ``--data /data/imagenet`` stay. The root noxfile discovers
``suites/*/sessions.py``, pytest ``tests/suites/*`` and the regression gate ``suites/*/regression.json``: the new
suite's sessions, tests and regression entry run at once, under its own name, with no edits elsewhere.
"""
from __future__ import annotations

import argparse
import keyword
import re
import shutil
import sys
from pathlib import Path

TEXT_SUFFIXES = {".py", ".md", ".json", ".yaml", ".yml", ".txt", ".cfg", ".toml"}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "checkpoint", "runs")


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


def copy_suite(root: Path, src: str, name: str) -> list[Path]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise SystemExit(f"suite name must be a lowercase Python identifier (e.g. lite0), got {name!r}")
    suites = root / "suites"
    if not (suites / src / "suite.py").is_file():
        have = sorted(p.name for p in suites.iterdir() if (p / "suite.py").is_file())
        raise SystemExit(f"no suite '{src}' on the runner under {suites} (a suites/<name>/suite.py); "
                         f"templates: {have}")
    pairs = [(suites / src, suites / name), (root / "tests" / "suites" / src, root / "tests" / "suites" / name)]
    for _s, d in pairs:
        if d.exists():
            raise SystemExit(f"{d} exists already: pick another name or remove it")
    m = re.search(r"^class (\w+)\(Suite\)", (suites / src / "suite.py").read_text(), re.M)
    files = {p.name: p.name.replace(src, name) for s, _d in pairs if s.is_dir() for p in s.rglob("*")
             if src in p.name and p.is_file()}
    rename = renamer(src, name, m.group(1) if m else None, {Path(a).stem: Path(b).stem for a, b in files.items()})
    made = []
    for s, d in pairs:
        if not s.is_dir():
            continue
        shutil.copytree(s, d, ignore=IGNORE)
        for f in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
            if f.is_file() and f.suffix in TEXT_SUFFIXES:
                f.write_text(rename(f.read_text()))
            if src in f.name:
                f.rename(f.with_name(f.name.replace(src, name)))
        made.append(d)
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--from", dest="src", default="imagenet")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    a = ap.parse_args(argv)
    for d in copy_suite(Path(a.root), a.src, a.name):
        print(f"created {d}")
    print(f"next (suites/README.md, 'Start a suite for your model'): edit suites/{a.name}/suite.py (model, recipe, "
          f"metric), data.py, baselines.json, README.md; run python3 -m nox -s {a.name}_qat -- --smoke")
    return 0


if __name__ == "__main__":
    sys.exit(main())
