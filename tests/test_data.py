"""Tests for fastpc.data: readers, search order, verified downloads, and the seeded loader."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fastpc.data import (
    DATASET_NAMES,
    BatchLoader,
    RemoteFile,
    Source,
    download,
    load_dataset,
    make_loaders,
    random_crop_flip,
    read_idx,
    safe_load_pickle,
    search_paths,
    split_indices,
)
from fastpc.data import sources
from fastpc.errors import UserError

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
_REAL_SYSTEM_PATHS = dict(sources.SYSTEM_PATHS)


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(autouse=True)
def data_isolated_env(tmp_path, monkeypatch):
    """No real data, env or cache leaks into a test: HOME is a temp folder, system paths off."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("FASTPC_DATA", "XDG_CACHE_HOME", "FASTPC_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sources, "SYSTEM_PATHS", {})
    # Any accidental real download must fail fast instead of hanging.
    for name in list(sources.SOURCES):
        src = sources.SOURCES[name]
        monkeypatch.setitem(sources.SOURCES, name, Source(("http://127.0.0.1:9/",), src.files, src.archive))
    return home


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x0C: ">i4"}[type_code]
    header = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dt).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = True, type_code: int = 0x08) -> Path:
    data = idx_bytes(arr, type_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_dataset(folder: Path, n_train: int = 50, n_test: int = 20, seed: int = 0, gz: bool = True):
    """Write an MNIST-layout dataset with random pixels; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        sfx = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{sfx}", x, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{sfx}", y, gz)
        arrays[split] = (x, y)
    return arrays


def write_pickle(path: Path, obj, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar10(folder: Path, per_batch: int = 4, protocol: int = pickle.HIGHEST_PROTOCOL):
    rng = np.random.default_rng(1)
    d = folder / "cifar-10-batches-py"
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        write_pickle(d / name, {b"batch_label": b"x", b"data": x, b"labels": y,
                                b"filenames": [b"f"] * per_batch}, protocol)
        xs.append(x)
        ys.append(y)
    write_pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol)
    return xs, ys


def make_cifar100(folder: Path, n_train: int = 12, n_test: int = 6):
    rng = np.random.default_rng(2)
    d = folder / "cifar-100-python"
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [v // 5 for v in fine]
        write_pickle(d / name, {b"data": x, b"fine_labels": fine, b"coarse_labels": coarse})
        out[name] = (x, fine)
    return out


COLORS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "eel": (0, 0, 255)}


def make_image_folder(root: Path, val_dir: str = "val", sizes=((8, 8),), per_class: int = 3) -> Path:
    for split in ("train", val_dir):
        for c, color in COLORS.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                Image.new("RGB", (w, h), color).save(d / f"{i}.png")
    return root


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def data_http_server(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1; yields ``(base_url, www_dir)``."""
    www = tmp_path / "www"
    www.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", www
    finally:
        server.shutdown()
        server.server_close()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    """Like torch.testing.assert_close (whose import alone costs seconds)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs difference {diff} > {atol}"


def _row_keys(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t}


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


# ----------------------------------------------------------------------------- IDX


def test_idx_round_trip_values_labels_and_normalization(tmp_path):
    arrays = make_idx_dataset(tmp_path / "mnist")
    ds = load_dataset("mnist", root=tmp_path, split="train", download=False)
    x, y = arrays["train"]
    assert ds.x.dtype == torch.float32 and ds.x.shape == (50, 1, 28, 28)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == y.tolist()
    assert ds.num_classes == 10 and ds.in_shape == (1, 28, 28)
    mean, std = ds.mean[0], ds.std[0]
    assert mean == pytest.approx(0.1307) and std == pytest.approx(0.3081)
    assert_close(ds.x[:, 0], (torch.from_numpy(x).float() / 255 - mean) / std)
    test = load_dataset("mnist", root=tmp_path, split="test", download=False)
    assert len(test) == 20 and test.y.tolist() == arrays["t10k"][1].tolist()


def test_idx_raw_files_and_int32_payload(tmp_path):
    make_idx_dataset(tmp_path / "kmnist", gz=False)
    ds = load_dataset("kmnist", root=tmp_path, download=False)
    assert len(ds) == 50
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    p = write_idx(tmp_path / "ints.idx", a, gz=False, type_code=0x0C)
    out = read_idx(p)
    assert out.dtype == np.int32 and (out == a).all() and out.flags.writeable


def test_idx_found_in_torchvision_layout(tmp_path):
    arrays = make_idx_dataset(tmp_path / "FashionMNIST" / "raw")
    ds = load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert ds.y.tolist() == arrays["train"][1].tolist()


def test_idx_truncated_payload_is_user_error_naming_file(tmp_path):
    x = np.zeros((10, 28, 28), np.uint8)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(x)[:-100]))
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\.gz is truncated"):
        read_idx(p)


def test_idx_truncated_gzip_stream_is_user_error(tmp_path):
    p = write_idx(tmp_path / "t.gz", np.ones((20, 28, 28), np.uint8) * 7)
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"t\.gz"):
        read_idx(p)


def test_idx_bad_magic_and_trailing_bytes(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x00\x00\x07\x03" + b"\x00" * 40)
    with pytest.raises(UserError, match=r"bad\.idx has bad magic number 0x00000703"):
        read_idx(p)
    p.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(UserError, match="bad magic"):
        read_idx(p)
    p.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8)) + b"extra")
    with pytest.raises(UserError, match="longer than its header"):
        read_idx(p)


def test_idx_inconsistent_pair_is_user_error(tmp_path):
    make_idx_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(49, np.uint8))
    with pytest.raises(UserError, match="50 images but .* 49 labels"):
        load_dataset("mnist", root=tmp_path, download=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(50, 10, np.uint8))
    with pytest.raises(UserError, match=r"labels in \[10, 10\].*\[0, 9\]"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_image_size_resizes_idx(tmp_path):
    make_idx_dataset(tmp_path)
    ds = load_dataset("mnist", root=tmp_path, download=False, image_size=32)
    assert ds.x.shape == (50, 1, 32, 32) and ds.in_shape == (1, 32, 32)
    with pytest.raises(UserError, match="image_size"):
        load_dataset("mnist", root=tmp_path, download=False, image_size=-3)


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_round_trip(tmp_path, protocol):
    xs, ys = make_cifar10(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", root=tmp_path, download=False)
    assert ds.x.shape == (20, 3, 32, 32) and ds.num_classes == 10
    assert ds.y.tolist() == sum(ys[:5], [])
    raw = np.concatenate(xs[:5]).reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    assert_close(ds.x * std + mean, torch.from_numpy(raw).float() / 255, atol=1e-5)
    assert ds.x[0, 0, 0, 1] == pytest.approx((xs[0][0, 1] / 255 - 0.4914) / 0.2470, abs=1e-5)
    test = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", split="test", download=False)
    assert test.y.tolist() == ys[5]


def test_cifar100_fine_labels(tmp_path):
    data = make_cifar100(tmp_path / "cifar100")
    ds = load_dataset("cifar100", root=tmp_path, download=False)
    assert ds.num_classes == 100 and ds.y.tolist() == data["train"][1]
    assert len(load_dataset("cifar100", root=tmp_path, split="test", download=False)) == 6


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "cifar-10-batches-py"
    make_cifar10(tmp_path)
    write_pickle(d / "data_batch_3", {b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(UserError, match=r"data_batch_3 is not a safe data pickle \(refusing global"):
        load_dataset("cifar10", root=tmp_path, download=False)
    assert not marker.exists()
    write_pickle(tmp_path / "e.pkl", [_EvalEvil()])
    with pytest.raises(UserError, match="builtins.eval"):
        safe_load_pickle(tmp_path / "e.pkl")


def test_cifar_object_array_and_bad_layout_rejected(tmp_path):
    make_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    write_pickle(d / "data_batch_1", {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]})
    with pytest.raises(UserError, match=r"expected uint8 \[N, 3072\]"):
        load_dataset("cifar10", root=tmp_path, download=False)
    write_pickle(d / "data_batch_1", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(UserError, match="lacks key"):
        load_dataset("cifar10", root=tmp_path, download=False)
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": 1})[:-5])
    with pytest.raises(UserError, match="data_batch_1"):
        load_dataset("cifar10", root=tmp_path, download=False)


# ----------------------------------------------------------------------------- image folder


@pytest.mark.parametrize("val_dir", ["val", "test"])
def test_image_folder_labels_and_pixels(tmp_path, val_dir):
    make_image_folder(tmp_path / "imagefolder", val_dir=val_dir)
    ds = load_dataset("imagefolder", root=tmp_path, download=False)
    assert ds.classes == ("cat", "dog", "eel") and ds.num_classes == 3
    assert ds.x.shape == (9, 3, 8, 8) and ds.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    pixels = (ds.x * std + mean) * 255
    for i, c in enumerate(ds.y.tolist()):
        expected = torch.tensor(COLORS[ds.classes[c]], dtype=torch.float32).view(3, 1, 1).expand(3, 8, 8)
        assert_close(pixels[i], expected, atol=1e-3)
    assert len(load_dataset("imagefolder", root=tmp_path, split="test", download=False)) == 9


def test_image_folder_resize_and_size_mismatch(tmp_path):
    make_image_folder(tmp_path, sizes=((8, 8), (12, 10)), per_class=24)  # > 64 images: threaded decode
    with pytest.raises(UserError, match="image_size"):
        load_dataset("imagefolder", root=tmp_path, download=False)
    ds = load_dataset("imagefolder", root=tmp_path, download=False, image_size=[6, 5])
    assert ds.x.shape == (72, 3, 6, 5) and ds.in_shape == (3, 6, 5)
    assert torch.bincount(ds.y).tolist() == [24, 24, 24]
    # solid colours stay solid after resizing
    assert torch.equal(ds.x.amax(dim=(2, 3)), ds.x.amin(dim=(2, 3)))


def test_image_folder_bad_inputs(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset("imagefolder", root=tmp_path, download=False)
    (tmp_path / "train" / "cat" / "broken.png").unlink()
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(UserError, match="zebra"):
        load_dataset("imagefolder", root=tmp_path, split="test", download=False)


def test_tiny_imagenet_val_annotations(tmp_path):
    make_image_folder(tmp_path)
    val = tmp_path / "val"
    for c in COLORS:
        for f in (val / c).iterdir():
            f.unlink()
        (val / c).rmdir()
    (val / "images").mkdir()
    lines = []
    for i, c in enumerate(["eel", "cat"]):
        Image.new("RGB", (8, 8), COLORS[c]).save(val / "images" / f"val_{i}.png")
        lines.append(f"val_{i}.png\t{c}\t0\t0\t8\t8")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("imagefolder", root=tmp_path, split="test", download=False)
    assert ds.y.tolist() == [2, 0]


# ----------------------------------------------------------------------------- where data is found


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="unknown dataset 'svhn'; valid names: " + ", ".join(DATASET_NAMES)):
        load_dataset("svhn")
    with pytest.raises(UserError, match="valid splits: train, test"):
        load_dataset("mnist", split="validation")
    assert load_dataset.__defaults__[0] == "fashion-mnist"


def test_search_order_root_then_env_then_cache(tmp_path, monkeypatch, data_isolated_env):
    home = data_isolated_env
    make_idx_dataset(home / ".cache" / "fastpc" / "mnist", n_train=30)
    assert len(load_dataset("mnist", download=False)) == 30
    env = tmp_path / "env"
    make_idx_dataset(env, n_train=40)  # directly in $FASTPC_DATA
    monkeypatch.setenv("FASTPC_DATA", str(env))
    assert len(load_dataset("mnist", download=False)) == 40
    make_idx_dataset(env / "mnist", n_train=45)  # $FASTPC_DATA/<name> beats $FASTPC_DATA
    assert len(load_dataset("mnist", download=False)) == 45
    root = tmp_path / "root"
    make_idx_dataset(root, n_train=35)
    ds = load_dataset("mnist", root=root, download=False)
    assert len(ds) == 35 and ds.path == root
    paths = search_paths("mnist", root)
    assert paths == [root / "mnist", root, env / "mnist", env, home / ".cache" / "fastpc" / "mnist"]


def test_system_path_searched_last(tmp_path, monkeypatch, data_isolated_env):
    system = tmp_path / "usr-share"
    make_idx_dataset(system, n_train=25)
    monkeypatch.setattr(sources, "SYSTEM_PATHS", {"fashion-mnist": system})
    assert len(load_dataset("fashion-mnist", download=False)) == 25
    make_idx_dataset(data_isolated_env / ".cache" / "fastpc" / "fashion-mnist", n_train=33)
    assert len(load_dataset("fashion-mnist", download=False)) == 33


def test_not_found_lists_every_searched_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPC_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(sources, "SYSTEM_PATHS", {"fashion-mnist": tmp_path / "sys"})
    with pytest.raises(UserError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "r", download=False)
    msg = str(info.value)
    assert "\n" not in msg
    for p in search_paths("fashion-mnist", tmp_path / "r"):
        assert str(p) in msg
    assert str(tmp_path / "sys") in msg and "home" in msg
    assert "data.root or $FASTPC_DATA" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "download" in msg


# ----------------------------------------------------------------------------- downloads


def _serve_idx(www: Path, name: str) -> dict[str, str]:
    arrays = make_idx_dataset(www / name)
    return arrays, {f.name: md5_of(f) for f in (www / name).iterdir()}


def test_download_verified_then_loads(tmp_path, monkeypatch, data_http_server):
    url, www = data_http_server
    arrays, md5s = _serve_idx(www, "mnist")
    files = tuple(RemoteFile(n, m) for n, m in sorted(md5s.items()))
    monkeypatch.setitem(sources.SOURCES, "mnist", Source((url + "mnist/",), files))
    data = tmp_path / "data"
    ds = load_dataset("mnist", root=data, download=True)
    assert ds.path == data / "mnist" and ds.y.tolist() == arrays["train"][1].tolist()
    assert sorted(p.name for p in (data / "mnist").iterdir()) == sorted(md5s)  # no temp files left


def test_download_via_fastpc_mirror_env(tmp_path, monkeypatch, data_http_server):
    url, www = data_http_server
    arrays, md5s = _serve_idx(www, "kmnist")
    files = tuple(RemoteFile(n, m) for n, m in sorted(md5s.items()))
    monkeypatch.setitem(sources.SOURCES, "kmnist", Source(("http://127.0.0.1:9/",), files))
    monkeypatch.setenv("FASTPC_MIRROR", url)
    monkeypatch.setenv("FASTPC_DATA", str(tmp_path / "d"))
    ds = load_dataset("kmnist", split="test")
    assert ds.path == tmp_path / "d" / "kmnist" and ds.y.tolist() == arrays["t10k"][1].tolist()


def test_download_checksum_mismatch_leaves_nothing_and_keeps_good_file(tmp_path, data_http_server):
    url, www = data_http_server
    (www / "f.bin").write_bytes(b"payload")
    dest_dir = tmp_path / "dl"
    good = hashlib.md5(b"payload").hexdigest()
    with pytest.raises(UserError, match=f"f.bin .*expected md5 {'0' * 32}, got {good}"):
        download(url + "f.bin", dest_dir / "f.bin", "0" * 32)
    assert list(dest_dir.iterdir()) == []
    (dest_dir / "f.bin").write_bytes(b"previous good content")
    with pytest.raises(UserError, match="checksum mismatch"):
        download(url + "f.bin", dest_dir / "f.bin", "0" * 32)
    assert (dest_dir / "f.bin").read_bytes() == b"previous good content"
    assert [p.name for p in dest_dir.iterdir()] == ["f.bin"]
    assert download(url + "f.bin", dest_dir / "f.bin", good).read_bytes() == b"payload"


def test_download_failure_is_one_line_user_error(tmp_path, monkeypatch, data_http_server):
    url, _ = data_http_server  # serves nothing: every file is a 404
    src = sources.SOURCES["fashion-mnist"]
    monkeypatch.setitem(sources.SOURCES, "fashion-mnist", Source((url,), src.files))
    with pytest.raises(UserError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "r")
    msg = str(info.value)
    assert "\n" not in msg and "downloading failed" in msg and "HTTP 404" in msg
    assert str(tmp_path / "r" / "fashion-mnist") in msg and "apt-get install" in msg
    assert not any((tmp_path / "r" / "fashion-mnist").iterdir())


def _tar_gz(src_dir: Path, arcname: str, out: Path) -> None:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src_dir, arcname=arcname)


def test_cifar_archive_download_and_extract(tmp_path, monkeypatch, data_http_server):
    url, www = data_http_server
    xs, ys = make_cifar10(tmp_path / "build")
    _tar_gz(tmp_path / "build" / "cifar-10-batches-py", "cifar-10-batches-py", www / "c10.tar.gz")
    monkeypatch.setitem(sources.SOURCES, "cifar10",
                        Source((url,), (RemoteFile("c10.tar.gz", md5_of(www / "c10.tar.gz")),), archive=True))
    ds = load_dataset("cifar10", root=tmp_path / "data", split="test")
    assert ds.y.tolist() == ys[5]
    assert [p.name for p in (tmp_path / "data" / "cifar10").iterdir()] == ["cifar-10-batches-py"]


def test_unsafe_archive_refused(tmp_path, monkeypatch, data_http_server):
    url, www = data_http_server
    with tarfile.open(www / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    monkeypatch.setitem(sources.SOURCES, "cifar100",
                        Source((url,), (RemoteFile("evil.tar.gz", md5_of(www / "evil.tar.gz")),), archive=True))
    with pytest.raises(UserError, match="unsafe entry"):
        load_dataset("cifar100", root=tmp_path / "data")
    assert not (tmp_path / "data" / "escaped.txt").exists()


# ----------------------------------------------------------------------------- loader


def _toy(n: int = 103, classes: int = 5):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    y = torch.arange(n) % classes
    return x, y


def test_loader_seeded_and_covers_every_example():
    x, y = _toy()
    a, b = BatchLoader(x, y, 10, seed=3), BatchLoader(x, y, 10, seed=3)
    ba, bb = batches(a), batches(b)
    assert len(a) == 11 and len(ba) == 11 and [len(t[1]) for t in ba][-1] == 3
    for (xa, ya), (xb, yb) in zip(ba, bb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.int64
    ids = torch.cat([t[0][:, 0, 0, 0] for t in ba]).long()
    assert sorted(ids.tolist()) == list(range(103))
    assert all(torch.equal(xb[:, 0, 0, 0].long() % 5, yb) for xb, yb in ba)  # x and y stay paired
    other = torch.cat([t[1] for t in batches(BatchLoader(x, y, 10, seed=4))])
    assert not torch.equal(torch.cat([t[0] for t in ba]).flatten(), torch.cat(
        [t[0] for t in batches(BatchLoader(x, y, 10, seed=4))]).flatten()) and len(other) == 103


def test_loader_epochs_differ_and_set_epoch_reproduces():
    x, y = _toy()
    loader = BatchLoader(x, y, 16, seed=0, drop_last=True)
    assert len(loader) == 6
    epochs = [batches(loader) for _ in range(3)]
    assert all(len(e) == 6 and all(len(t[1]) == 16 for t in e) for e in epochs)
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])
    loader.set_epoch(1)
    again = batches(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, epochs[1]))
    fresh = BatchLoader(x, y, 16, seed=0, drop_last=True)
    fresh.set_epoch(2)  # resuming at epoch 2 in a new process
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(fresh), epochs[2]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 20), drop_last=st.booleans(), grouped=st.booleans(),
       k=st.integers(1, 3), seed=st.integers(0, 2**40))
def test_loader_len_matches_iteration_and_no_duplicates(n, bs, drop_last, grouped, k, seed):
    x, y = _toy(n, 4)
    k = min(k, bs)
    loader = BatchLoader(x, y, bs, seed=seed, drop_last=drop_last, grouped=grouped, classes_per_batch=k)
    got = batches(loader)
    assert len(got) == len(loader)
    ids = torch.cat([xb[:, 0, 0, 0] for xb, _ in got]).long().tolist() if got else []
    assert len(ids) == len(set(ids))
    if not drop_last:
        assert sorted(ids) == list(range(n))
    assert all(len(yb) <= bs for _, yb in got)


def test_eval_loader_is_sequential():
    x, y = _toy(25)
    loader = BatchLoader(x, y, 10, shuffle=False)
    got = batches(loader)
    assert [len(t[1]) for t in got] == [10, 10, 5]
    assert torch.equal(torch.cat([t[0] for t in got]), x)


def test_val_split_disjoint_and_deterministic():
    tr, va = split_indices(1000, 0.1, seed=7)
    assert len(va) == 100 and len(tr) == 900
    assert not set(tr.tolist()) & set(va.tolist()) and len(set(tr.tolist()) | set(va.tolist())) == 1000
    tr2, va2 = split_indices(1000, 0.1, seed=7)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(va, split_indices(1000, 0.1, seed=8)[1])
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(UserError, match=r"val_split must be a number in \[0, 1\)"):
            split_indices(1000, bad, 0)
    with pytest.raises(UserError, match="at least one"):
        split_indices(10, 0.01, 0)


def test_make_loaders_val_split_and_defaults(tmp_path):
    make_idx_dataset(tmp_path, n_train=50, n_test=20)
    train, val, test, info = make_loaders("mnist", batch_size=8, seed=1, val_split=0.2, root=tmp_path,
                                          download=False, eval_batch_size=16)
    assert info.num_classes == 10 and info.in_shape == (1, 28, 28)
    assert train.num_examples == 40 and val.num_examples == 10 and test.num_examples == 20
    assert len(train) == 5 and len(val) == 1 and len(test) == 2 and not train.augment
    train_x = torch.cat([x for x, _ in train]).flatten(1)
    val_x = torch.cat([x for x, _ in val]).flatten(1)
    full = load_dataset("mnist", root=tmp_path, download=False).x.flatten(1)
    train_keys, val_keys = _row_keys(train_x), _row_keys(val_x)
    assert len(train_keys) == 40 and len(val_keys) == 10 and not train_keys & val_keys
    assert train_keys | val_keys == _row_keys(full)
    val_again = make_loaders("mnist", 8, 1, val_split=0.2, root=tmp_path, download=False).val
    assert torch.equal(torch.cat([x for x, _ in val_again]).flatten(1), val_x)
    assert make_loaders("mnist", 8, 1, root=tmp_path, download=False).val is None
    with pytest.raises(UserError, match="batch size must be a positive integer"):
        make_loaders("mnist", 0, 1, root=tmp_path, download=False)
    with pytest.raises(UserError, match="device"):
        make_loaders("mnist", 8, 1, root=tmp_path, download=False, device="nonsense")


def test_grouped_batches_are_class_pure_and_seeded():
    x, y = _toy(103, 5)
    loader = BatchLoader(x, y, 8, seed=5, grouped=True)
    got = batches(loader)
    assert len(got) == len(loader) == sum(-(-c // 8) for c in torch.bincount(y).tolist())
    assert all(len(set(yb.tolist())) == 1 for _, yb in got)
    assert sorted(torch.cat([xb[:, 0, 0, 0] for xb, _ in got]).long().tolist()) == list(range(103))
    assert len({int(yb[0]) for _, yb in got[:6]}) > 1  # classes are interleaved, not sorted
    again = BatchLoader(x, y, 8, seed=5, grouped=True)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(again), got))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches(loader), got))  # epoch 1 differs
    dl = BatchLoader(x, y, 8, seed=5, grouped=True, drop_last=True)
    assert all(len(yb) == 8 for _, yb in dl) and len(batches(dl)) == len(dl)
    two = BatchLoader(x, y, 8, seed=5, grouped=True, classes_per_batch=2)
    got2 = batches(two)
    assert len(got2) == len(two) and all(len(set(yb.tolist())) <= 2 for _, yb in got2)
    assert sum(len(yb) for _, yb in got2) == 103


def test_augmentation_shapes_seeded_and_content():
    x = torch.randn(16, 3, 8, 8)
    y = torch.zeros(16, dtype=torch.long)
    a = batches(BatchLoader(x, y, 16, seed=2, shuffle=False, augment=True))
    b = batches(BatchLoader(x, y, 16, seed=2, shuffle=False, augment=True))
    assert a[0][0].shape == x.shape and torch.equal(a[0][0], b[0][0])
    loader = BatchLoader(x, y, 16, seed=2, shuffle=False, augment=True)
    loader.set_epoch(1)
    assert not torch.equal(batches(loader)[0][0], a[0][0])
    # each output is a shifted window of the zero-padded (optionally flipped) input
    out = a[0][0]
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        cands = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in cands)
    assert not torch.equal(out, x)
    g = torch.Generator().manual_seed(0)
    flips = random_crop_flip(x, g, padding=0, flip=True)
    assert all(torch.equal(flips[i], x[i]) or torch.equal(flips[i], x[i].flip(2)) for i in range(16))
    filled = random_crop_flip(torch.zeros(64, 2, 4, 4), g, padding=4, flip=False, fill=[5.0, -1.0])
    assert set(filled[:, 0].unique().tolist()) <= {0.0, 5.0} and (filled[:, 0] == 5).any()


def test_make_loaders_augments_cifar_train_only(tmp_path):
    make_cifar10(tmp_path)
    train, val, test, info = make_loaders("cifar10", 4, 0, root=tmp_path, download=False)
    assert train.augment and not test.augment and val is None and info.in_shape == (3, 32, 32)
    assert train.fill == pytest.approx([-0.4914 / 0.2470, -0.4822 / 0.2435, -0.4465 / 0.2616])
    assert not make_loaders("cifar10", 4, 0, root=tmp_path, download=False, augment=False).train.augment


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_path(monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_PATHS", _REAL_SYSTEM_PATHS)
    t0 = time.perf_counter()
    train = load_dataset("fashion-mnist", download=False)
    elapsed = time.perf_counter() - t0
    test = load_dataset("fashion-mnist", split="test", download=False)
    assert train.path == REAL_FMNIST
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.num_classes == 10 and torch.bincount(train.y).tolist() == [6000] * 10
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01
    assert elapsed < 3.0, f"loading Fashion-MNIST took {elapsed:.2f}s"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_loader_on_cuda_matches_cpu():
    x, y = _toy(50, 5)
    cpu = batches(BatchLoader(x, y, 8, seed=1, augment=True))
    gpu = batches(BatchLoader(x, y, 8, seed=1, augment=True, device="cuda"))
    assert gpu[0][0].is_cuda and all(torch.equal(a[0], b[0].cpu()) for a, b in zip(cpu, gpu))


# ----------------------------------------------------------------------------- data.grouped (config)


def test_config_grouped_makes_label_grouped_train_batches_seeded_and_resumable(tmp_path):
    """``data.grouped: k`` reaches the train loader (at most k classes per batch); its order
    depends only on (train.seed, epoch), so ``set_epoch`` (what a resume does) replays an epoch
    of an uninterrupted run; the test loader stays sequential."""
    from fastpc.build import make_run_loaders
    from fastpc.config import load_config
    from tinydata import tiny_overrides, write_tiny_idx

    root = write_tiny_idx(tmp_path / "mnist", n_train=200, n_test=40)
    cfg = load_config(None, tiny_overrides(root, tmp_path / "run", **{"data.grouped": 2, "train.seed": 4}))
    assert cfg.data.grouped == 2
    train, _, test, _ = make_run_loaders(cfg, torch.device("cpu"))
    assert train.grouped and train.classes_per_batch == 2 and not test.grouped
    epochs = [batches(train) for _ in range(3)]
    assert all(len(set(yb.tolist())) <= 2 for e in epochs for _, yb in e)
    assert sorted(torch.cat([yb for _, yb in epochs[0]]).tolist()) == sorted(train.y.tolist())
    assert any(len(set(yb.tolist())) == 2 for _, yb in epochs[0])  # chunks of two classes meet
    resumed, _, _, _ = make_run_loaders(cfg, torch.device("cpu"))
    resumed.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches(resumed), epochs[2]))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epochs[1], epochs[2]))
    plain = make_run_loaders(load_config(None, tiny_overrides(root, tmp_path / "run")), torch.device("cpu")).train
    assert not plain.grouped


@pytest.mark.parametrize("value", [0, 33])
def test_config_grouped_out_of_range_is_one_clear_error(value, tmp_path):
    from fastpc.config import load_config

    with pytest.raises(UserError, match=r"data.grouped: must be null or classes per batch in \[1, "
                                        r"data.batch_size=32\], got " + str(value)):
        load_config(None, [f"data.grouped={value}", "data.batch_size=32"])
