"""Optional TensorBoard event files beside metrics.csv (``train.tensorboard: true``).

A run writes ``<run>/tensorboard/events.out.tfevents.*`` with one scalar per metrics.csv column
(the same numbers, tagged with the column names: ``train_loss``, ``test_acc``, ``lr``,
``seconds``, ...) at global step = epoch, through ``torch.utils.tensorboard.SummaryWriter``.
A resumed run opens its writer with ``purge_step`` = the first epoch it trains, so epochs
logged after the checkpoint it resumes from (and then redone) are not shown twice. Only the
main process of a distributed run writes. tensorboard is an optional dependency
(``pip install fastpc[tensorboard]``); :func:`require` checks for it before a run writes anything.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError
from .runfiles import METRIC_FIELDS

__all__ = ["FOLDER", "EpochLog", "require", "epoch_log"]

FOLDER = "tensorboard"
_STEP_FIELD = "epoch"


def require() -> None:
    """A one-line UserError unless the tensorboard package can be imported."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise UserError(f"train.tensorboard=true needs the tensorboard package ({e}); "
                        "pip install fastpc[tensorboard], or set train.tensorboard=false") from None


class EpochLog:
    """Writes each epoch's metrics row; a disabled log (``folder`` None) writes nothing."""

    def __init__(self, folder: Path | None, first_epoch: int) -> None:
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder), purge_step=first_epoch)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row (metrics.csv's columns) as scalars at step ``row["epoch"]``; empty
        cells (None) are left out."""
        if self.writer is None:
            return
        step = int(row[_STEP_FIELD])
        for key in METRIC_FIELDS:
            if key != _STEP_FIELD and row.get(key) is not None:
                self.writer.add_scalar(key, float(row[key]), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextmanager
def epoch_log(run_dir: Path, start_epoch: int, enabled: bool) -> Iterator[EpochLog]:
    """The run's :class:`EpochLog` (writing to ``run_dir/tensorboard`` when ``enabled``), whose
    first epoch is ``start_epoch + 1``; closed on the way out."""
    log = EpochLog(run_dir / FOLDER if enabled else None, start_epoch + 1)
    try:
        yield log
    finally:
        log.close()
