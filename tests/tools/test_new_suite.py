"""tools/new_suite.py: a suite made from the minimal classifier template and from each family's suite (imagenet, yolov5,
transformers) runs at once under its own name (sessions, all of its tests, outputs, regression entry), holds only the
suite's own pieces, and its prose is untouched."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = ("suites/__init__.py", "suites/__main__.py", "suites/common", "tests/__init__.py", "tests/conftest.py",
          "tests/processes.py", "tests/suites/__init__.py", "tests/suites/late_rank.py", "noxfile.py", "pyproject.toml",
          "tools")

# family -> (new name, its class, its smoke command (script, args) or None, what must stay as written (prose,
#            library names) in a file of the copy); every copy's tests run in full
CASES = {
    "classifier": ("lite0", "Lite0Suite", ("main.py", ["--smoke"]), ("README.md", "torchvision classifier")),
    "imagenet": ("fashion", "FashionSuite", None, ("suite.py", "IMAGENET1K_V1")),
    "yolov5": ("det", "DetSuite", ("train_qat.py", ["--smoke", "--quantize"]), ("README.md", "YOLOv5")),
    "transformers": ("textcls", "TextclsSuite", None, ("model.py", "from transformers import")),
}
TEMPLATES = REPO / "tools" / "templates"


def _own_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _source(src: str) -> Path:
    return TEMPLATES / src if (TEMPLATES / src).is_dir() else REPO / "suites" / src


def _repo_copy(root: Path, src: str) -> None:
    own = () if (TEMPLATES / src).is_dir() else (f"suites/{src}", f"tests/suites/{src}")
    for rel in (*SHARED, *own):
        s, d = REPO / rel, root / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if s.is_dir() else shutil.copy)(s, d, **(
            {"ignore": shutil.ignore_patterns("__pycache__", "checkpoint")} if s.is_dir() else {}))


@pytest.mark.parametrize("src", list(CASES))
def test_new_suite_runs_its_sessions_and_all_its_tests_at_once(tmp_path, src):
    name, cls, smoke_cmd, (kept_file, kept_text) = CASES[src]
    root = tmp_path / "repo"
    _repo_copy(root, src)
    r = subprocess.run([sys.executable, str(root / "tools/new_suite.py"), name, "--from", src, "--root", str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    new = root / "suites" / name
    # every file of the suite and nothing else (the pipeline is suites/common/runner.py), renamed where named by it
    word = re.compile(rf"(?<![A-Za-z0-9]){src}(?![A-Za-z0-9-])")
    assert _own_files(new) == {word.sub(name, f) for f in _own_files(_source(src)) if not f.startswith("tests/")}
    code = {p.relative_to(new).as_posix(): p.read_text() for p in new.rglob("*") if p.is_file()}
    tests = {p.name: p.read_text() for p in (root / "tests/suites" / name).iterdir() if p.is_file()}
    assert not any(f"suites.{src}" in t or f"suites/{src}" in t for t in [*code.values(), *tests.values()])
    assert f'name = "{name}"' in code["suite.py"] and f"class {cls}(Suite):" in code["suite.py"]
    assert kept_text in code[kept_file]  # prose and library names stay
    assert "sessions.py" not in code and len(code[json.loads(code["regression.json"])["script"]].splitlines()) <= 5
    if src == "classifier":  # the minimal template: one suite.py, its author's lines (not the pipeline's)
        assert len(code["suite.py"].splitlines()) <= 100
    if src == "imagenet":  # a classification suite is a few hundred lines: only its own pieces
        assert sum(len(t.splitlines()) for f, t in code.items() if f.endswith(".py")) < 700
    # nox discovers the new sessions, the regression gate its entry, without edits elsewhere
    listing = subprocess.run([sys.executable, "-m", "nox", "-f", str(root / "noxfile.py"), "-l"],
                             capture_output=True, text=True, cwd=root)
    assert listing.returncode == 0, listing.stderr
    for s in (f"{name}_qat", f"{name}_float_eval", f"{name}_export", f"{name}_regression"):
        assert s in listing.stdout
    gate = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tools'); import regression_gate as g;"
                           " print([p.name for p in g.discover(g.ROOT / 'suites')])"], capture_output=True, text=True,
                          cwd=root)
    assert f"'{name}'" in gate.stdout, gate.stderr
    # the copy's smoke run: its own code, outputs in <output-dir>/<name>/, the metrics naming the new suite
    if smoke_cmd:
        script, args = smoke_cmd
        out = tmp_path / "out"
        run = subprocess.run([sys.executable, str(new / script), *args, "--threads", "1", "--output-dir", str(out)],
                             capture_output=True, text=True, cwd=root)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        metrics = [json.loads(p.read_text()) for p in (out / name).glob("*_metrics.json")]
        assert metrics and metrics[0]["suite"] == name and metrics[0]["ort"] is not None
    # all of the copy's tests (not only its smoke)
    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        str(root / "tests/suites" / name)], capture_output=True, text=True, cwd=root)
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-2000:]
    assert " passed" in t.stdout and "failed" not in t.stdout
    # a second copy under the same name is refused
    again = subprocess.run([sys.executable, str(root / "tools/new_suite.py"), name, "--from", src, "--root",
                            str(root)], capture_output=True, text=True)
    assert again.returncode != 0 and "exists already" in again.stderr
