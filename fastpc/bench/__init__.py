"""Benchmark suites behind ``fastpc bench SUITE``.

Each suite is a module ``fastpc.bench.<name>`` that defines

- ``add_arguments(parser: argparse.ArgumentParser) -> None`` — its options, and
- ``run(args: argparse.Namespace) -> int`` — runs the suite, prints a table, writes its results
  (markdown + JSON, with the exact command that produced them) under ``benchmarks/results/``
  and returns the exit status. ``args.argv`` holds the suite's own arguments as given to
  ``fastpc bench SUITE`` (the command to record).

The CLI imports a suite only when it is asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SUITES: dict[str, str] = {
    "speed": "fastpc.bench.speed",
    "depth": "fastpc.bench.depth",
    "ep": "fastpc.bench.ep",
    "il": "fastpc.bench.il",
    "init": "fastpc.bench.init",
    "ddp": "fastpc.bench.ddp",
    "imagenet-step": "fastpc.bench.imagenet_step",
    "precision": "fastpc.bench.precision",
    "gpu": "fastpc.bench.gpu",
}


def get_suite(name: str) -> ModuleType:
    if name not in SUITES:
        raise KeyError(name)
    return importlib.import_module(SUITES[name])
