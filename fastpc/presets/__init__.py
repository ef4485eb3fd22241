"""Preset run configurations, one YAML file per experiment, shipped inside the package.

``fastpc train NAME`` runs ``NAME.yaml`` from this folder (``fastpc train cifar10-vgg5-epc``);
``quickstart.yaml`` spells out the built-in defaults. Read through :mod:`importlib.resources`,
so an installed wheel finds the same presets as a source checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["list_presets", "preset_path"]


def list_presets() -> list[str]:
    """The preset names, sorted (``["cifar10-resnet18-epc", ..., "quickstart"]``)."""
    return sorted(f.name[: -len(".yaml")] for f in files(__name__).iterdir() if f.name.endswith(".yaml"))


def preset_path(name: str) -> Path | None:
    """The YAML file of preset ``name``, or None when no preset has that name."""
    if not name or "/" in name or "\\" in name:
        return None
    resource = files(__name__) / f"{name}.yaml"
    # pip installs unpacked, so the resource is a file on disk (a pathlib.Path).
    return Path(str(resource)) if resource.is_file() else None
