"""The run folder's guarantees: atomic files, verified checkpoints, one writer, safe replacement.

- Every file is written to a temporary file beside it, fsynced and renamed over the old one: a
  reader, or a kill at any instant, sees the old file or the new one, never a mix. Temporaries a
  kill leaves behind (``.last.pt.*.tmp``) are removed by the next process that locks the folder.
- A checkpoint is a zip archive whose members carry CRC-32s; :func:`load_checkpoint` checks
  every one before unpickling, so a damaged checkpoint is refused, never trained on.
- :class:`RunLock`: one process at a time holds ``<run>/.lock`` (an ``flock``; the file records
  the holder's pid). The kernel drops the lock when its process dies, so a lock file left by a
  killed process is simply taken over.
- :func:`inspect_run_dir` tells a fastpc run folder from anything else; only a run folder may be
  replaced (``--overwrite``), and a folder a kill left before the first checkpoint restarts.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from .errors import UserError

__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "LOCK", "RunState", "RunLock", "atomic_write_text",
           "check_replaceable", "clear_run_dir", "inspect_run_dir", "load_checkpoint", "remove_temporaries",
           "save_checkpoint", "save_config", "writing"]

CHECKPOINT = Path("checkpoints") / "last.pt"
CHECKPOINT_FORMAT = "fastpc-checkpoint-1"
LOCK = ".lock"
RESULT_FILES = frozenset({"config.yaml", "metrics.csv", "energy_trace.json", "summary.json",
                          "checkpoints", "plots", "diagnostics"})


def _one_line(e: object) -> str:
    return " ".join(str(e).split())


# ---- atomic files -------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file + rename: readers see the old or the new file."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_config(cfg: Any, path: Path) -> None:
    """Write a resolved :class:`fastpc.config.Config` as YAML, atomically."""
    from .config import dump_config

    atomic_write_text(Path(path), dump_config(cfg))


def _is_temporary(name: str) -> bool:
    """A temporary of :func:`_atomic_write` (``.last.pt.abc123.tmp``) or of the plots."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".tmp.png"))


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporaries a killed writer left in ``run_dir`` (hold its lock first)."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "plots", run_dir / "diagnostics"):
        if folder.is_dir():
            for p in folder.iterdir():
                if _is_temporary(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


# ---- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically (temporary file + rename)."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def _damaged_member(data: bytes) -> str | None:
    """The first member of the zip ``data`` whose bytes fail their CRC-32, or None."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.testzip()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a fastpc checkpoint after checking its integrity (the CRC-32 of every zip member)
    and safely (``weights_only=True``: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    expected = "expected a checkpoint written by fastpc train"
    try:
        data = path.read_bytes()
        bad = _damaged_member(data)
    except Exception as e:  # not a zip, truncated, unreadable
        raise UserError(f"checkpoint {path} is unreadable or unsafe ({_one_line(e)[:200] or type(e).__name__}); "
                        f"{expected}") from None
    if bad is not None:
        raise UserError(f"checkpoint {path} is damaged: {bad} fails its CRC check; restore an intact copy "
                        "or start the run again")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code, not a torch file, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is unreadable or unsafe ({msg[:200]}); {expected}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a fastpc checkpoint (format {CHECKPOINT_FORMAT})")
    return state


# ---- what a folder is ---------------------------------------------------------------------------
class RunState(enum.Enum):
    """What ``train.out`` names."""

    ABSENT = "absent"        # nothing there, or an empty folder
    UNSTARTED = "unstarted"  # only what a kill before the first checkpoint leaves (config.yaml, temporaries)
    RUN = "run"              # a fastpc run folder
    FOREIGN = "foreign"      # a folder fastpc did not make


def _entries(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n != LOCK and not _is_temporary(n)]


def _is_fastpc_config(path: Path) -> bool:
    from .config import config_from_dict, read_yaml, upgrade_stored_config

    try:
        d = read_yaml(path)
        config_from_dict(upgrade_stored_config(d))
    except UserError:
        return False
    return isinstance(d, dict)


def inspect_run_dir(run_dir: Path) -> RunState:
    """Classify ``run_dir``; a path that is a file (or lies under one) is a UserError."""
    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == run_dir else f"lies under the file {p}"
            raise UserError(f"train.out={run_dir} {what}; expected a folder path for the run")
    if not run_dir.exists():
        return RunState.ABSENT
    names = set(_entries(run_dir))
    if not names:
        return RunState.ABSENT
    if (run_dir / CHECKPOINT).is_file():
        return RunState.RUN
    if "config.yaml" not in names or not names <= RESULT_FILES or not _is_fastpc_config(run_dir / "config.yaml"):
        return RunState.FOREIGN
    ckpt_dir = run_dir / "checkpoints"
    if names <= {"config.yaml", "checkpoints"} and (not ckpt_dir.exists() or
                                                     (ckpt_dir.is_dir() and not _entries(ckpt_dir))):
        return RunState.UNSTARTED
    return RunState.RUN


def check_replaceable(run_dir: Path) -> None:
    """Refuse to delete the current folder, one above it, the home folder or a symlink."""
    here = Path.cwd().resolve()
    target = run_dir.resolve()
    if run_dir.is_symlink() or target == here or target in here.parents or target == Path.home().resolve():
        raise UserError(f"refusing to replace {run_dir}: it is the current folder, one above it, the home "
                        "folder or a symbolic link; choose a run folder below the current one for train.out")


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but its lock (call with the lock held)."""
    check_replaceable(run_dir)
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ---- one writer at a time -----------------------------------------------------------------------
class RunLock:
    """Exclusive lock on a run folder: ``flock`` on ``<run>/.lock``, which records the holder's pid.

    ``acquire(create=True)`` makes the folder (and missing parents) first; ``release`` removes the
    lock file and the folders ``acquire`` made if they are still empty (nothing was written)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self, create: bool = False) -> None:
        if create:
            self._made = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.try_acquire():
            raise UserError(f"run folder {self.run_dir} is in use by another fastpc process "
                            f"(pid {self.holder()}, lock {self.path}); wait for it to finish or choose "
                            "another train.out")

    def try_acquire(self) -> bool:
        """Take the lock if no live process holds it; False if one does."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            if self._same_file(fd):
                break
            os.close(fd)  # the holder removed the file between our open and flock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def holder(self) -> str:
        """The pid recorded in the lock file, or '?'."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        for p in self._made:  # deepest first; stops at the first folder that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def writing(run_dir: Path) -> Iterator[None]:
    """Turn an OSError while writing ``run_dir`` (full or read-only disk, a file in the way) into a
    one-line UserError; files are replaced atomically, so what was written before is intact."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or _one_line(e) or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "free some space"
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            hint = "choose a writable train.out"
        else:
            hint = "check the path"
        where = f" ({e.filename})" if e.filename else ""
        kept = (f"; the last checkpoint {run_dir / CHECKPOINT} is intact"
                if (run_dir / CHECKPOINT).is_file() else "")
        raise UserError(f"cannot write to run folder {run_dir}: {reason}{where}; {hint}{kept}") from None
