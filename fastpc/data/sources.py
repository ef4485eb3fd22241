"""Dataset catalogue, where data is looked for, and verified downloads.

Search order for a dataset ``<name>`` (first folder holding the files wins):

1. the explicit ``root`` argument (config ``data.root``): ``root/<name>``, then ``root`` itself;
2. ``$FASTPC_DATA``: ``$FASTPC_DATA/<name>``, then ``$FASTPC_DATA`` itself;
3. ``~/.cache/fastpc/<name>`` (``$XDG_CACHE_HOME/fastpc/<name>`` when that is set);
4. a system path from :data:`SYSTEM_PATHS` (Debian's ``dataset-fashion-mnist`` package).

Files found locally are only validated structurally (headers and sizes), because
redistributed copies (e.g. Debian's recompressed ``.gz`` files) differ byte-wise from
the originals. Downloaded files are verified against the official md5 in
:data:`SOURCES` *before* they are moved into place.

Tests and private mirrors can redirect downloads either by replacing an entry of
:data:`SOURCES` (``monkeypatch.setitem``) or by setting ``$FASTPC_MIRROR``: files
are then fetched from ``$FASTPC_MIRROR/<name>/<filename>`` (checksums unchanged).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import http.client
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fastpc.errors import UserError

__all__ = [
    "DATASET_NAMES",
    "SPECS",
    "SOURCES",
    "SYSTEM_PATHS",
    "DatasetSpec",
    "RemoteFile",
    "Source",
    "cache_dir",
    "check_name",
    "download",
    "download_dir",
    "fetch",
    "md5sum",
    "one_line",
    "search_paths",
]


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset: reader kind, shape, classes and normalisation."""

    name: str
    kind: str  # "idx", "cifar" or "imagefolder"
    num_classes: int | None  # None: taken from the class folders
    in_shape: tuple[int, int, int] | None  # (C, H, W); None: set by image_size / the images
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None
    layout: str = ""  # what a data folder must contain, for error messages
    apt: str | None = None  # Debian package that provides the data


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and its official md5."""

    filename: str
    md5: str


@dataclass(frozen=True)
class Source:
    """Where to download a dataset: base URLs tried in order, files, and whether they are archives."""

    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    archive: bool = False  # .tar.gz files that are extracted into the data folder, then removed


_IDX_LAYOUT = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gz or raw)"
)

SPECS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", "idx", 10, (1, 28, 28), (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        _IDX_LAYOUT, "dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        "mnist", "idx", 10, (1, 28, 28), (0.1307,), (0.3081,),
        tuple(str(i) for i in range(10)), _IDX_LAYOUT,
    ),
    "kmnist": DatasetSpec(
        "kmnist", "idx", 10, (1, 28, 28), (0.1918,), (0.3483,),
        ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), _IDX_LAYOUT,
    ),
    "cifar10": DatasetSpec(
        "cifar10", "cifar", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        "cifar-10-batches-py/ with data_batch_1..5 and test_batch",
    ),
    "cifar100": DatasetSpec(
        "cifar100", "cifar", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        None, "cifar-100-python/ with train and test",
    ),
    "imagefolder": DatasetSpec(
        "imagefolder", "imagefolder", None, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
        None, "train/<class>/*.jpg|png and val/<class>/... (or test/)",
    ),
}

DATASET_NAMES: tuple[str, ...] = tuple(SPECS)

# Official sources and md5s (as published by the dataset authors; the same values torchvision checks).
SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        (
            RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
    ),
    "mnist": Source(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        (
            RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "kmnist": Source(
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        (
            RemoteFile("train-images-idx3-ubyte.gz", "bdb82020997e1d708af4cf47b453dcf7"),
            RemoteFile("train-labels-idx1-ubyte.gz", "e144d726b3acfaa3e44228e80efcd344"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "5c965bf0a639b31b8f53240b1b52f4d7"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "7320c461ea6c1c855c0b718fb2a4b134"),
        ),
    ),
    "cifar10": Source(
        ("https://www.cs.toronto.edu/~kriz/",),
        (RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        archive=True,
    ),
    "cifar100": Source(
        ("https://www.cs.toronto.edu/~kriz/",),
        (RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        archive=True,
    ),
}

# Read-only system locations searched last.
SYSTEM_PATHS: dict[str, Path] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
}

DOWNLOAD_TIMEOUT_S = 60.0


def one_line(e: object) -> str:
    """``str(e)`` with all whitespace runs (newlines included) collapsed, for one-line errors."""
    return " ".join(str(e).split())


def check_name(name: object) -> str:
    """Return the canonical dataset name (case and ``_``/``-`` insensitive) or raise UserError."""
    key = str(name).strip().lower().replace("_", "-") if isinstance(name, str) else None
    aliases = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
               "image-folder": "imagefolder"}
    key = aliases.get(key, key)
    if key not in SPECS:
        raise UserError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastpc`` or ``~/.cache/fastpc``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastpc"


def search_paths(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for dataset ``name``, in priority order (see module docstring)."""
    name = check_name(name)
    paths: list[Path] = []
    for base in (root, os.environ.get("FASTPC_DATA") or None):
        if base is not None and str(base) != "":
            base = Path(base).expanduser()
            paths += [base / name, base]
    paths.append(cache_dir() / name)
    if name in SYSTEM_PATHS:
        paths.append(Path(SYSTEM_PATHS[name]))
    seen: set[Path] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def download_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where downloads go: ``root/<name>``, else ``$FASTPC_DATA/<name>``, else the cache."""
    name = check_name(name)
    if root is not None and str(root) != "":
        return Path(root).expanduser() / name
    env = os.environ.get("FASTPC_DATA")
    if env:
        return Path(env).expanduser() / name
    return cache_dir() / name


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DownloadError(UserError):
    """A network/IO failure while downloading (the caller may try another mirror)."""


def download(url: str, dest: str | os.PathLike, md5: str | None,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5`` before the file appears.

    The data is streamed into a hidden temporary file in ``dest``'s folder, hashed on the
    way, and only renamed onto ``dest`` when the checksum matches. On any failure the
    temporary file is removed and an existing ``dest`` is left untouched.
    Raises :class:`UserError` on a checksum mismatch (naming file, expected and got md5)
    and :class:`DownloadError` (a UserError) on network or disk errors.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DownloadError(f"cannot write to {dest.parent}: {one_line(e.strerror or e)}; "
                            "choose a writable data.root or $FASTPC_DATA") from None
    tmp = Path(tmp_name)
    ok = False
    try:
        h = hashlib.md5()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while block := resp.read(1 << 20):
                    h.update(block)
                    out.write(block)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DownloadError(f"download of {url} failed: {one_line(reason)}") from None
        got = h.hexdigest()
        if md5 is not None and got != md5.lower():
            raise UserError(f"checksum mismatch for {dest.name} downloaded from {url}: "
                            f"expected md5 {md5.lower()}, got {got}; the file was discarded")
        os.replace(tmp, dest)
        ok = True
    finally:
        if not ok:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    return dest


def _mirrors(name: str, source: Source) -> tuple[str, ...]:
    env = os.environ.get("FASTPC_MIRROR")
    if env:
        return (env.rstrip("/") + f"/{name}/",)
    return source.mirrors


def _extract_tar(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz safely: regular files and folders only, nothing outside ``dest``."""
    dest_resolved = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                target = (dest_resolved / m.name).resolve()
                if not (m.isfile() or m.isdir()) or os.path.isabs(m.name) or \
                        not target.is_relative_to(dest_resolved):
                    raise UserError(f"archive {archive} contains an unsafe entry {m.name!r}; "
                                    "expected only files inside the dataset folder")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot extract {archive}: {one_line(e)}; delete it and download again") from None


def fetch(name: str, dest_dir: str | os.PathLike, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download every missing file of dataset ``name`` into ``dest_dir`` (verified by md5).

    Archives are extracted into ``dest_dir`` and then deleted. Each file is tried from
    every mirror in turn; if all fail, :class:`DownloadError` names the URLs tried.
    """
    name = check_name(name)
    if name not in SOURCES:
        raise UserError(f"dataset {name!r} cannot be downloaded; set data.root to a folder with "
                        f"{SPECS[name].layout}")
    source = SOURCES[name]
    dest_dir = Path(dest_dir)
    for rf in source.files:
        target = dest_dir / rf.filename
        if target.exists():
            continue
        errors = []
        for base in _mirrors(name, source):
            url = base if base.endswith(rf.filename) else base.rstrip("/") + "/" + rf.filename
            print(f"fastpc: downloading {url} -> {target}", flush=True)  # stdout: stderr is for the one error line
            try:
                download(url, target, rf.md5, timeout=timeout)
                break
            except DownloadError as e:
                errors.append(str(e))
        else:
            raise DownloadError("; ".join(errors))
        if source.archive:
            _extract_tar(target, dest_dir)
            target.unlink()
    return dest_dir
