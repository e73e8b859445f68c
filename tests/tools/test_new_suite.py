import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_new_suite_runs_its_sessions_and_smoke_test_at_once(tmp_path):
    root = tmp_path / "repo"
    for rel in ("suites/__init__.py", "suites/common", "suites/imagenet", "tests/__init__.py", "tests/conftest.py",
                "tests/suites/imagenet", "noxfile.py", "pyproject.toml", "tools/new_suite.py"):
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    for init in ("tests/suites/__init__.py",):
        if (REPO / init).exists():
            shutil.copy(REPO / init, root / init)
    r = subprocess.run([sys.executable, str(root / "tools/new_suite.py"), "fashion", "--from", "imagenet",
                        "--root", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (root / "suites/fashion/main.py").exists() and (root / "tests/suites/fashion").is_dir()
    test_file = next((root / "tests/suites/fashion").glob("test_*.py"))
    assert "suites.fashion" in test_file.read_text() and "suites.imagenet" not in test_file.read_text()
    # nox discovers the new sessions without edits elsewhere
    listing = subprocess.run([sys.executable, "-m", "nox", "-f", str(root / "noxfile.py"), "-l"],
                             capture_output=True, text=True, cwd=root)
    assert listing.returncode == 0, listing.stderr
    for s in ("fashion_qat", "fashion_float_eval", "fashion_export", "fashion_regression", "imagenet_qat"):
        assert s in listing.stdout
    # and its smoke test passes, importing the new suite's own code
    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "smoke_pipeline",
                        str(test_file)], capture_output=True, text=True, cwd=root)
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-2000:]
    assert "1 passed" in t.stdout
    # a second copy under the same name is refused
    again = subprocess.run([sys.executable, str(root / "tools/new_suite.py"), "fashion", "--root", str(root)],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "exists already" in again.stderr
