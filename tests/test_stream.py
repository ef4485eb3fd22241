"""The streaming image-folder loader (fastpc.data.stream): transforms against their definitions,
normalisation against the in-memory loader, the seeded order and crops (resume, workers), errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import two_path_tol
from PIL import Image

from fastpc.config import load_config
from fastpc.data import BatchLoader, load_dataset, make_loaders
from fastpc.data.imagefolder import collect_images
from fastpc.data.stream import StreamLoader, resolve_stream, train_crop_box
from fastpc.errors import UserError
from fastpc.train import fit

pytestmark = pytest.mark.usefixtures("isolated")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the image-folder normalisation


def make_folder(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] | None = None,
                ext: str = "jpg", seed: int = 0) -> Path:
    """``root/imagefolder/{train,val}/<class>/*.ext`` of random RGB images (sizes vary unless ``size``)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / "imagefolder" / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = size or rng.integers(40, 100, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.{ext}")
    return root


def stream(root: Path, **kw) -> tuple:
    opts = dict(batch_size=4, root=root, download=False, image_size=32, stream=True, workers=0, eval_batch_size=5)
    return make_loaders("imagefolder", **{**opts, **kw})


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_shapes_and_loader_interface(tmp_path):
    train, val, test, info = stream(make_folder(tmp_path), val_split=0.25)
    assert isinstance(train, StreamLoader) and info.in_shape == (3, 32, 32) and info.num_classes == 3
    assert (train.num_examples, val.num_examples, test.num_examples) == (9, 3, 12)
    got = batches(train)
    assert len(got) == len(train) == 3 and [len(y) for _, y in got] == [4, 4, 1]
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in got)
    assert sorted(torch.cat([y for _, y in got]).tolist()) == sorted(y for _, y in train.dataset.items)
    hx, hy = test.head(7)
    first = batches(test)
    assert torch.equal(hx[:5], first[0][0]) and torch.equal(hy[:5], first[0][1])  # head: first examples, eval crop


def test_eval_transform_normalisation_equals_in_memory_loader(tmp_path):
    """Images already at the evaluation resize (224 * 256/224 = 256): the eval transform is the
    center 224 x 224 crop, so the streamed batch equals the in-memory (unresized) tensor's center."""
    make_folder(tmp_path, classes=2, per_class=2, size=(256, 256))
    ds = load_dataset("imagefolder", root=tmp_path, split="test", download=False)  # (N, 3, 256, 256)
    _, _, test, _ = stream(tmp_path, image_size=224)
    (x, y), = batches(test)
    torch.testing.assert_close(x, ds.x[:, :, 16:240, 16:240], **two_path_tol(torch.float32, 2))
    assert torch.equal(y, ds.y)


def test_train_crop_box_follows_its_definition():
    """Area fraction in [0.08, 1] and aspect ratio in [3/4, 4/3] (up to rounding to whole pixels),
    inside the image; fallback: the center crop of the clamped ratio."""
    for width, height in ((256, 256), (300, 120), (64, 500)):
        for s in range(200):
            left, top, w, h = train_crop_box(np.random.default_rng(s), width, height)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            if (w, h) == (width, height) or w == width or h == height:
                continue  # the fallback (or a full-side crop)
            assert 0.08 - 2 / min(w, h) <= w * h / (width * height) <= 1
            assert 3 / 4 - 2 / h <= w / h <= 4 / 3 + 2 / h
    assert train_crop_box(_NoTries(), 1000, 100) == (433, 0, 133, 100)  # ratio 10 clamped to 4/3


class _NoTries:
    """A generator whose every try fails (an area bigger than the image)."""

    def uniform(self, low, high):
        return high * 1e3

    def integers(self, low, high):
        raise AssertionError("no box accepted")


def test_training_crops_read_back_from_a_coordinate_image(tmp_path):
    """An image whose red channel is its x coordinate and green its y: the crop's pixels tell the
    box, which must respect RandomResizedCrop's area and ratio ranges; flips occur, both ways."""
    d = tmp_path / "imagefolder"
    xs, ys = np.meshgrid(np.arange(256), np.arange(256))
    img = np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8)  # (H, W, 3)
    for split in ("train", "val"):
        (d / split / "a").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(img).save(d / split / "a" / f"{i}.png")
    train, _, _, _ = stream(tmp_path, batch_size=40)
    (x, _), = batches(train)
    px = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    red, green = px[:, 0] * 255, px[:, 1] * 255  # (B, 32, 32)
    w = (red[:, 16, -2] - red[:, 16, 1]) * 32 / 29  # slope x 32 output pixels (negative: flipped)
    h = (green[:, -2, 16] - green[:, 1, 16]) * 32 / 29
    flipped = w < 0
    w = w.abs()
    assert 0 < flipped.sum() < len(flipped)
    assert torch.all(h > 0)
    area, ratio = w * h / 256 ** 2, w / h
    assert torch.all(area > 0.08 * 0.8) and torch.all(area < 1.05)
    assert torch.all(ratio > 0.75 * 0.9) and torch.all(ratio < 4 / 3 * 1.1)
    assert area.std() > 0.1  # crops of very different sizes


def test_order_is_batchloaders_seeded_global_order():
    """The same index batches as BatchLoader (seeded global order), alone and sharded over ranks."""
    items = [(Path(f"/nonexistent/{i}.jpg"), i % 3) for i in range(23)]
    for epoch, world in ((0, 1), (5, 1), (2, 2), (3, 3)):
        for rank in range(world):
            ref = BatchLoader(torch.arange(23)[:, None], torch.arange(23), 4, seed=7)
            s = StreamLoader(items, (8, 8), 4, seed=7)
            if world > 1:
                ref.shard(rank, world)
                s.shard(rank, world)
            ref.set_epoch(epoch)
            want = [xb[:, 0] for xb, _ in ref]
            got = list(s.index_batches(epoch))
            assert len(s) == len(ref) == len(want) == len(got)
            assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_resume_sees_the_same_crops_and_workers_do_not_matter(tmp_path):
    make_folder(tmp_path)
    run = stream(tmp_path).train
    epochs = [batches(run) for _ in range(3)]  # epochs 0, 1, 2 in one go
    assert not torch.equal(epochs[1][0][0], epochs[2][0][0])  # epochs differ
    resumed = stream(tmp_path).train
    resumed.set_epoch(2)
    assert_same_batches(batches(resumed), epochs[2])
    parallel = stream(tmp_path, workers=2).train
    parallel.set_epoch(1)
    assert_same_batches(batches(parallel), epochs[1])
    assert_same_batches(batches(stream(tmp_path, workers=2).test), batches(stream(tmp_path).test))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_one_line_user_error_naming_file(tmp_path, workers):
    make_folder(tmp_path)
    bad = tmp_path / "imagefolder" / "train" / "c1" / "2.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    train = stream(tmp_path, workers=workers).train
    with pytest.raises(UserError) as e:
        batches(train)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_stream_choice_and_config_errors(tmp_path):
    assert resolve_stream("auto", (224, 224), 10) and resolve_stream("auto", (32, 32), 60_000)
    assert not resolve_stream("auto", (64, 64), 10) and not resolve_stream("auto", None, 10 ** 6)
    assert not resolve_stream(False, (224, 224), 10 ** 6)
    with pytest.raises(UserError, match="image_size"):
        resolve_stream(True, None, 10)
    with pytest.raises(UserError, match="data.stream"):
        load_config(None, ["data.stream=true"])  # fashion-mnist
    with pytest.raises(UserError, match="data.workers"):
        load_config(None, ["data.workers=-1"])
    make_folder(tmp_path)  # auto at 32 x 32 with 12 images: in memory
    assert isinstance(stream(tmp_path, stream="auto").train, BatchLoader)


def test_training_run_on_a_streamed_folder(tmp_path):
    """fit() on a streamed folder: the energy trace batch is the test loader's head; resuming the
    1-epoch run to 2 epochs gives the weights of a 2-epoch run (same crops after set_epoch)."""
    make_folder(tmp_path)
    sets = ["data.name=imagefolder", f"data.root={tmp_path}", "data.download=false", "data.image_size=16",
            "data.stream=true", "data.workers=0", "data.batch_size=4", "model.width=8", "model.depth=2",
            "learner.iters=2", "optim.schedule=none", "train.progress=false"]
    full = fit(load_config(None, sets + [f"train.out={tmp_path / 'full'}", "train.epochs=2"]))
    fit(load_config(None, sets + [f"train.out={tmp_path / 'part'}", "train.epochs=1"]))
    part = fit(load_config(None, sets + [f"train.out={tmp_path / 'part'}", "train.epochs=2"]), resume=True)
    assert full.data["train_examples"] == 12 and full.data["test_examples"] == 12
    assert part.test_acc == full.test_acc
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["learner"]["net"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)["learner"]["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert collect_images(tmp_path / "imagefolder" / "train", ["c0", "c1", "c2"])[0][1] == 0


@pytest.mark.slow
def test_imagenet_presets_one_step_and_one_evaluation_at_224(tmp_path):
    """`fastpc bench imagenet-step` with a tiny batch on generated JPEGs: both presets run a step
    and an evaluation at 224 x 224 from the streamed folder, report time and memory, start from
    the same loss (same seed, same crops, another process) and the step lowers the batch's loss."""
    import argparse
    import json

    from fastpc.bench import imagenet_step

    root = imagenet_step.make_image_folder(tmp_path / "folder", classes=10, eval_images=3)
    args = argparse.Namespace(batch_size=2, image_size=224, classes=10, eval_images=3,
                              presets=list(imagenet_step.PRESETS), data_root=str(root), workers=2, threads=2,
                              device="cpu", out=str(tmp_path / "results"), argv=["--batch-size", "2"])
    assert imagenet_step.run(args) == 0
    rows = json.loads((tmp_path / "results" / "imagenet_step.json").read_text())["results"]
    assert [r["learner"] for r in rows] == ["ep", "bp"]
    for r in rows:
        assert r["image_size"] == [224, 224] and r["batch_size"] == 2 and r["classes"] == 10
        assert r["step_s"] > 0 and r["step_peak_mib"] > 0 and r["eval_images"] == 3
        assert r["loss_after"] < r["loss_before"]
    assert rows[0]["loss_before"] == rows[1]["loss_before"]
    assert "imagenet-step" in (tmp_path / "results" / "imagenet_step.md").read_text()
