#!/usr/bin/env python3
"""Start a new suite from an existing one.

    python tools/new_suite.py NAME --from imagenet [--root REPO]

Copies ``suites/<from>/`` to ``suites/<NAME>/`` and ``tests/suites/<from>/`` to ``tests/suites/<NAME>/``,
renaming the suite in paths and text (``imagenet`` -> ``NAME``, ``ImageNet`` -> ``Name``, so nox sessions
``imagenet_qat`` become ``NAME_qat``). The root noxfile discovers ``suites/*/sessions.py`` and pytest
discovers ``tests/suites/*``: the new suite's sessions and tests run at once, with no edits elsewhere.
"""
from __future__ import annotations

import argparse
import keyword
import re
import shutil
import sys
from pathlib import Path

TEXT_SUFFIXES = {".py", ".md", ".json", ".yaml", ".yml", ".txt", ".cfg", ".toml"}


def _rename_text(text: str, old: str, new: str) -> str:
    text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(old)}", new, text)
    title_old = {"imagenet": "ImageNet"}.get(old, old.capitalize())
    return text.replace(title_old, new.capitalize())


def copy_suite(root: Path, src: str, name: str) -> list[Path]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise SystemExit(f"suite name must be a lowercase Python identifier, got {name!r}")
    made = []
    for base in (root / "suites", root / "tests" / "suites"):
        s, d = base / src, base / name
        if not s.is_dir():
            if base.name == "suites" and base.parent == root:
                raise SystemExit(f"no suite '{src}' under {base}; existing: "
                                 f"{sorted(p.name for p in base.iterdir() if (p / 'sessions.py').exists())}")
            continue
        if d.exists():
            raise SystemExit(f"{d} exists already: pick another name or remove it")
        shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "checkpoint", "runs"))
        for f in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
            if f.is_file() and f.suffix in TEXT_SUFFIXES:
                f.write_text(_rename_text(f.read_text(), src, name))
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
    print(f"next: edit suites/{a.name}/ (model, data, baselines.json); run python3 -m nox -s {a.name}_qat")
    return 0


if __name__ == "__main__":
    sys.exit(main())
