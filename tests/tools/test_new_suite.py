"""tools/new_suite.py: a suite made from imagenet runs at once under its own name (sessions, tests, outputs,
regression entry), holds only the suite's own pieces, and its prose is untouched."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OWN = {"__init__.py", "main.py", "suite.py", "data.py", "sessions.py", "baselines.json", "regression.json", "README.md"}


def test_new_suite_runs_its_sessions_and_smoke_test_at_once(tmp_path):
    root = tmp_path / "repo"
    for rel in ("suites/__init__.py", "suites/common", "suites/imagenet", "tests/__init__.py", "tests/conftest.py",
                "tests/suites/__init__.py", "tests/suites/imagenet", "noxfile.py", "pyproject.toml",
                "tools/new_suite.py", "tools/regression_gate.py"):
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst, **(
            {"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    r = subprocess.run([sys.executable, str(root / "tools/new_suite.py"), "fashion", "--from", "imagenet",
                        "--root", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    new = root / "suites/fashion"
    # only the suite's own pieces (the pipeline is suites/common/runner.py), a few hundred lines of Python
    assert {p.name for p in new.iterdir()} == OWN
    assert sum(len(p.read_text().splitlines()) for p in new.glob("*.py")) < 700
    # identifiers and paths renamed, prose kept
    code = {p.name: p.read_text() for p in [*new.iterdir(), *(root / "tests/suites/fashion").iterdir()] if p.is_file()}
    assert not any("suites.imagenet" in t or "suites/imagenet" in t for t in code.values())
    assert 'name = "fashion"' in code["suite.py"] and "class FashionSuite(Suite):" in code["suite.py"]
    assert "IMAGENET1K_V1" in code["suite.py"] and "ImageNet weights" in code["README.md"]
    assert "def fashion_qat(" in code["sessions.py"] and "checkpoint/fashion/mobilenet_v2_metrics.json" in code[
        "README.md"]
    test_file = root / "tests/suites/fashion/test_fashion_suite.py"
    assert "from suites.fashion import main as suite_main" in test_file.read_text()
    # nox discovers the new sessions, the regression gate its entry, without edits elsewhere
    listing = subprocess.run([sys.executable, "-m", "nox", "-f", str(root / "noxfile.py"), "-l"],
                             capture_output=True, text=True, cwd=root)
    assert listing.returncode == 0, listing.stderr
    for s in ("fashion_qat", "fashion_float_eval", "fashion_export", "fashion_regression", "imagenet_qat"):
        assert s in listing.stdout
    gate = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tools'); import regression_gate as g;"
                           " print([p.name for p in g.discover(g.ROOT / 'suites')])"], capture_output=True, text=True,
                          cwd=root)
    assert "'fashion'" in gate.stdout and "'imagenet'" in gate.stdout, gate.stderr
    # its smoke test passes, running the new suite's own code with outputs in <output-dir>/fashion/
    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "smoke_pipeline",
                        str(test_file)], capture_output=True, text=True, cwd=root)
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-2000:]
    assert "1 passed" in t.stdout
    # a second copy under the same name is refused
    again = subprocess.run([sys.executable, str(root / "tools/new_suite.py"), "fashion", "--root", str(root)],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "exists already" in again.stderr
