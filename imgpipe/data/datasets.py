"""Fetch a known public dataset into a folder, verified by sha256, ready for `dvc add`.

    imgpipe fetch fashion-mnist data/raw/fashion-mnist

Fashion-MNIST (MIT licence) comes from the Debian package `dataset-fashion-mnist` when it is
installed (or can be installed: root with apt-get), otherwise from the dataset's public
release. Either way every file must match the published sha256 or nothing is written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from imgpipe.core.hashing import file_hexdigest


@dataclass(frozen=True)
class Dataset:
    files: dict[str, str]  # file name -> sha256
    classes: tuple[str, ...]
    debian_package: str
    debian_dir: str
    release_url: str


DATASETS = {
    "fashion-mnist": Dataset(
        files={
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
        # label i is classes[i], as in the dataset's README
        classes=("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"),
        debian_package="dataset-fashion-mnist",
        debian_dir="/usr/share/datasets/fashion-mnist",
        release_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
}


class FetchError(RuntimeError):
    pass


def is_complete(folder: Path, ds: Dataset) -> bool:
    return all((folder / name).is_file() and file_hexdigest(folder / name, "sha256") == digest for name, digest in ds.files.items())


def _try_debian(ds: Dataset) -> Path | None:
    folder = Path(ds.debian_dir)
    if not folder.is_dir() and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"installing the Debian package {ds.debian_package} ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", ds.debian_package], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folder if folder.is_dir() else None


def fetch(name: str, target: Path) -> str:
    """Fill `target` with the verified files; returns where they came from."""
    ds = DATASETS[name]
    if is_complete(target, ds) and (target / "classes.txt").is_file():
        return "already present"
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent if target.parent.exists() else None) as tmp:
        tmp = Path(tmp)
        debian = _try_debian(ds)
        origin = f"Debian package {ds.debian_package}" if debian else ds.release_url
        for file_name, digest in ds.files.items():
            out = tmp / file_name
            if debian:
                shutil.copyfile(debian / file_name, out)
            else:
                try:
                    urllib.request.urlretrieve(ds.release_url + file_name, out)
                except OSError as exc:
                    raise FetchError(f"cannot download {file_name} from {ds.release_url}: {exc}; "
                                     f"install the Debian package {ds.debian_package} or check the network") from None
            got = file_hexdigest(out, "sha256")
            if got != digest:
                raise FetchError(f"{file_name} from {origin}: sha256 {got} does not match the published {digest}")
        (tmp / "classes.txt").write_text("\n".join(ds.classes) + "\n", encoding="utf-8")
        target.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, target / f.name)
    return origin
