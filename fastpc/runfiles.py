"""A run folder's result files and stored config: what ``fit`` writes and ``report`` reads.

    metrics.csv          one row per epoch (:data:`METRIC_FIELDS`)
    energy_trace.json    per epoch: energy over inference iterations on a fixed test batch
    summary.json         :class:`RunSummary`, written last
    config.yaml          the resolved config; must match the one stored in the checkpoint

Damaged files (empty, truncated, edited) are UserErrors naming the file; nothing is redrawn
or trained from them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import plots
from .config import Config, config_from_dict, config_to_dict, load_config, read_yaml, upgrade_stored_config
from .errors import UserError
from .rundir import atomic_write_text

__all__ = ["METRIC_FIELDS", "RunSummary", "history_fields", "format_acc", "format_test", "read_metrics", "write_metrics",
           "read_json", "write_json", "write_results", "results_complete", "run_config", "check_run_config"]

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "train_energy", "val_loss", "val_acc",
                 "test_loss", "test_acc", "seconds", "eval_seconds", "smm_per_step", "smm_total", "iters"]
# sequential matrix multiplications (``Learner.smm``): mean per training step of the epoch, and
# the run's total so far; empty for a learner without a count. Runs written before these two
# columns existed hold the header without them, which still reads.
_SMM_FIELDS = 2
# iters: inference iterations actually run, mean per training step (a tolerance may stop early).
# A header may stop before any of these later columns (runs written before they existed).
_BASE_FIELDS = len(METRIC_FIELDS) - _SMM_FIELDS - 1


# ---- summary.json -------------------------------------------------------------------------------
def history_fields(history: dict[str, list]) -> dict[str, Any]:
    """The summary's fields that come from the per-epoch ``history["metrics"]`` rows."""
    rows = history["metrics"]
    lastrow = rows[-1] if rows else {}
    return {
        "epochs_completed": len(rows),
        "test_acc": lastrow.get("test_acc"),
        "test_loss": lastrow.get("test_loss"),
        "val_acc": lastrow.get("val_acc"),
        "train_acc": lastrow.get("train_acc"),
        "train_energy": lastrow.get("train_energy"),
        "epoch_seconds": [r["seconds"] for r in rows],
        "train_seconds": sum(r["seconds"] for r in rows),
        "smm_per_step": lastrow.get("smm_per_step"),
        "smm_total": lastrow.get("smm_total"),
        "inference_iters": lastrow.get("iters"),
    }


@dataclass
class RunSummary:
    """What ``fit`` returns and writes as summary.json (:meth:`to_json`, fields in this order).
    ``summary["test_acc"]`` reads a field by its summary.json name."""

    status: str
    """running, completed, diverged or interrupted."""
    run_dir: str
    epochs_completed: int
    test_acc: float | None
    """Accuracy in % after the last completed epoch; None without test examples."""
    test_loss: float | None
    val_acc: float | None
    train_acc: float | None
    train_energy: float | None
    epoch_seconds: list[float]
    """Training seconds of every epoch (evaluation not included)."""
    train_seconds: float
    smm_per_step: float | None
    """Sequential matrix multiplications per training step (mean over the last epoch), the
    paper's cost unit (``Learner.smm``); None for a learner without a count."""
    smm_total: int | None
    """Sequential matrix multiplications of every training step so far."""
    inference_iters: float | None
    """Inference iterations actually run per training step, mean over the last epoch (below
    ``learner.iters`` when ``learner.tol`` stopped inference early; 0 for bp)."""
    learner: str
    learner_options: dict[str, Any]
    compiled_step: bool
    """Whether the learner's training step ran compiled."""
    compile_failed: str | None
    """Why compiling failed (the step then ran eagerly), or None."""
    params: int
    device: str
    torch: str
    data: dict[str, Any]
    """Which data the run used (``fastpc.build.data_record``)."""
    config: dict[str, Any]
    """The resolved config, as config.yaml holds it."""
    diverged_at: dict[str, int] | None = None
    """``{"epoch": e, "step": s}`` of a diverged run (absent from summary.json otherwise)."""
    generative: dict[str, Any] | None = None
    """``model.mode: generative`` only (absent otherwise): ``recon_error``, the mean ½‖ŷ − y‖² per
    test image after inference (test_loss), and ``consistency``, the amortized init's
    autoencoder consistency ‖f_l(g_l(s)) − s‖ per layer on a test batch after every epoch."""

    @classmethod
    def from_history(cls, history: dict[str, list], **fields: Any) -> RunSummary:
        """A summary whose per-epoch fields come from ``history`` (:func:`history_fields`)."""
        return cls(**history_fields(history), **fields)

    def to_json(self) -> dict[str, Any]:
        """summary.json's object: every field in order, ``diverged_at`` only when set."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("diverged_at", "generative"):
            if out[key] is None:
                del out[key]
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]


def format_acc(acc: float | None) -> str:
    """``87.81%``, or ``no test data`` for a split without examples."""
    return "no test data" if acc is None else f"{acc:.2f}%"


def format_test(generative: bool, test_loss: float | None, test_acc: float | None) -> str:
    """A run's test result in one phrase: ``test_acc 87.81%``, or for a generative run
    ``test reconstruction error 21.4 per image`` (``no test data`` without test examples)."""
    if not generative:
        return f"test_acc {format_acc(test_acc)}"
    return "no test data" if test_loss is None else f"test reconstruction error {test_loss:.4g} per image"


# ---- metrics.csv and the JSON files -------------------------------------------------------------
def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.csv with one row per epoch (columns :data:`METRIC_FIELDS`), atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in METRIC_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _metrics_damage(text: str) -> str | None:
    """Why a metrics.csv text is not one fastpc wrote whole, or None."""
    if not text.strip():
        return "it is empty"
    if not text.endswith("\n"):
        return "its last line is cut off"
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames not in [METRIC_FIELDS[:k] for k in range(_BASE_FIELDS, len(METRIC_FIELDS) + 1)]:
        return f"its header is {reader.fieldnames}, expected {METRIC_FIELDS}"
    width = len(reader.fieldnames)
    n = 0
    for n, r in enumerate(reader, 1):
        if None in r or any(v is None for v in r.values()):
            return f"row {n} has {len(r) - (None in r)} of {width} columns"
        try:
            values = {k: float(v) for k, v in r.items() if v != ""}
        except ValueError:
            return f"row {n} holds a value that is not a number"
        if values.get("epoch") != n:
            return f"row {n} is epoch {r['epoch']!r}, expected {n}"
    return None if n else "it holds no epoch"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.csv; a damaged (empty, truncated, edited) file is a UserError."""
    text = Path(path).read_text()
    why = _metrics_damage(text)
    if why is not None:
        raise UserError(f"{path} is damaged ({why}); it is written by fastpc train, one row per epoch")
    return [{k: (float(v) if v != "" else None) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, kind: type) -> Any:
    """A run's JSON result file, None if absent; unreadable or not a ``kind`` (dict or list) is
    a UserError."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({' '.join(str(e).split())}); it is written by fastpc train") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged: it holds a {type(value).__name__}, expected a JSON "
                        f"{'object' if kind is dict else 'list'}; it is written by fastpc train")
    return value


def write_results(run_dir: Path, history: dict[str, list], summary: RunSummary | dict[str, Any],
                  plot: bool) -> None:
    """metrics.csv, energy_trace.json, the plots (``plot``), and summary.json last: a summary
    that says ``completed`` means every other file is complete."""
    write_metrics(run_dir / "metrics.csv", history["metrics"])
    write_json(run_dir / "energy_trace.json", history["energy"])
    if plot:
        plots.write_run_plots(run_dir, history["metrics"], history["energy"])
    write_json(run_dir / "summary.json", summary.to_json() if isinstance(summary, RunSummary) else summary)


def results_complete(run_dir: Path, epochs: int) -> bool:
    """summary.json (written last) says the run completed ``epochs`` epochs."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("status") == "completed" \
        and summary.get("epochs_completed") == epochs


# ---- config.yaml ----------------------------------------------------------------------------------
def run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config of the run folder ``run_dir`` (its config.yaml, keys renamed since read under
    their new names) with ``--set`` ``overrides``."""
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a fastpc run folder (no config.yaml)")
    return load_config(run_dir / "config.yaml", overrides, stored=True)


def _run_config_dict(path: Path) -> dict[str, Any]:
    """A run's config.yaml as a normalised dict; an empty, truncated or invalid file is a UserError."""
    d = read_yaml(path)
    sections = list(config_to_dict(Config()))
    missing = [k for k in sections if not isinstance(d, dict) or k not in d]
    if missing:
        raise UserError(f"{path} is damaged (empty or truncated: no {', '.join(missing)} section); "
                        "fastpc train writes every section; restore it from a copy")
    return config_to_dict(config_from_dict(upgrade_stored_config(d)))


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{s}.{k}: {a[s].get(k)!r} vs {b[s].get(k)!r}" for s in a for k in a[s] if a[s].get(k) != b[s].get(k)]


def check_run_config(run_dir: Path, ckpt: dict[str, Any], path: Path) -> None:
    """A run's config.yaml must be the config its checkpoint ``ckpt`` (from ``path``) was written
    with, or, after a kill between writing the two, the one it replaced."""
    found = _run_config_dict(run_dir / "config.yaml")
    stored = [config_to_dict(config_from_dict(upgrade_stored_config(ckpt[k])))
              for k in ("config", "previous_config") if ckpt.get(k)]
    if stored and found not in stored:
        diff = _differences(found, stored[0])
        raise UserError(f"{run_dir / 'config.yaml'} does not match the config stored in {path} "
                        f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}, config.yaml vs checkpoint); "
                        "it was damaged or edited: restore it, and change settings with --set")
