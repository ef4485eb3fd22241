"""Datasets for fastpc: location/download, safe readers, and a fast seeded in-memory loader.

Typical use::

    from fastpc.data import make_loaders
    train, val, test, info = make_loaders("fashion-mnist", batch_size=64, seed=0, val_split=0.1)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train: ...

See :mod:`fastpc.data.sources` for where data is searched and how downloads are verified.
"""

from .cifar import SafeUnpickler, load_cifar, safe_load_pickle
from .datasets import Dataset, DatasetInfo, Loaders, load_dataset, make_loaders, normalize
from .idx import read_idx, read_idx_pair
from .imagefolder import load_image_folder
from .loader import BatchLoader, make_generator, random_crop_flip, split_indices
from .stream import StreamLoader
from .sources import (
    DATASET_NAMES,
    SOURCES,
    SPECS,
    DatasetSpec,
    RemoteFile,
    Source,
    cache_dir,
    download,
    fetch,
    md5sum,
    search_paths,
)

__all__ = [
    "DATASET_NAMES",
    "SOURCES",
    "SPECS",
    "BatchLoader",
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "Loaders",
    "RemoteFile",
    "SafeUnpickler",
    "StreamLoader",
    "Source",
    "cache_dir",
    "download",
    "fetch",
    "load_cifar",
    "load_dataset",
    "load_image_folder",
    "make_generator",
    "make_loaders",
    "md5sum",
    "normalize",
    "random_crop_flip",
    "read_idx",
    "read_idx_pair",
    "safe_load_pickle",
    "search_paths",
    "split_indices",
]
