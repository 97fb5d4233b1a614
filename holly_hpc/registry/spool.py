"""Registry writes that survive a database outage, and a database that lost the experiment's rows.

A task writes through SpooledRegistry. A write that fails is appended to <task dir>/registry-spool.jsonl
and training goes on; before the next write, and at task end, the spool is replayed in order. Every
write is idempotent (natural keys, ON CONFLICT, client-side timestamps), so a replay that is itself
interrupted and repeated adds nothing twice. `holly-hpc registry sync` replays spools left behind by
tasks that ended while the database was still away.

A write that reaches the database but finds no row to write to (MissingRows: the SQLite file was deleted,
or the URL now names a new, empty database) would otherwise vanish without an error. Then the registry is
restored from the experiment folder (schema, experiment and run rows: `restore`) and the write retried;
a write is counted only when it landed, and the spool is removed only when every write did.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import STAMPED_WRITES, TASK_WRITES, MissingRows

SPOOL_FILE = "registry-spool.jsonl"
WRITES = TASK_WRITES  # the writes that are spooled: the interface says which (registry/base.py)


@dataclass
class ReplayResult:
    sent: int  # writes that landed
    total: int  # writes the spool held
    error: str | None  # why the first write that did not land failed
    restored: bool = False  # the experiment's rows had to be written again first
    unreadable: int = 0  # lines cut short by a crash mid-write, moved to <spool>.unreadable

    @property
    def done(self) -> bool:
        return self.sent + self.unreadable == self.total

    def __bool__(self) -> bool:  # "did the replay empty the spool?"
        return self.done


def write_restoring(registry, method: str, args, kwargs, restore: Callable[[], None] | None, restored: list):
    """One write; when it finds its rows missing, restore them once and write again."""
    try:
        return getattr(registry, method)(*args, **kwargs)
    except MissingRows:
        if restore is None:
            raise
        restore()
        restored.append(True)
        return getattr(registry, method)(*args, **kwargs)


class SpooledRegistry:
    def __init__(self, registry, spool_path: Path, label: str = "task", restore: Callable[[], None] | None = None):
        self.registry, self.spool_path, self.label, self.restore = registry, Path(spool_path), label, restore
        self._warned = False

    def __getattr__(self, name):
        if name not in WRITES:
            return getattr(self.registry, name)  # reads go straight to the database
        return lambda *args, **kwargs: self._write(name, args, kwargs)

    def _write(self, method: str, args: tuple, kwargs: dict):
        if method in STAMPED_WRITES and "at" not in kwargs:
            kwargs = {**kwargs, "at": time.time()}  # the moment it happened, kept through a replay
        if self.pending() and not self.replay().done:
            self._append(method, args, kwargs)
            return None
        restored: list = []
        try:
            result = write_restoring(self.registry, method, args, kwargs, self.restore, restored)
        except Exception as exc:
            self._append(method, args, kwargs)
            if not self._warned:
                print(
                    f"[{self.label}] registry unavailable ({exc}); spooling to {self.spool_path}, training goes on",
                    file=sys.stderr,
                    flush=True,
                )
                self._warned = True
            return None
        if restored:
            print(
                f"[{self.label}] the registry had lost this experiment's rows; wrote them again from the "
                "experiment folder",
                file=sys.stderr,
                flush=True,
            )
        return result

    def _append(self, method: str, args: tuple, kwargs: dict) -> None:
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symbolic link planted at the spool's name is refused, not written through.
        fd = os.open(self.spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with open(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"method": method, "args": list(args), "kwargs": kwargs}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def pending(self) -> int:
        return len(_lines(self.spool_path))

    def replay(self) -> ReplayResult:
        """Send the spooled writes in order (restoring missing rows first when needed)."""
        return replay_spool(self.registry, self.spool_path, self.restore)


def replay_spool(registry, path: Path, restore: Callable[[], None] | None = None) -> ReplayResult:
    """Replay one spool file into `registry`; the lines that could not be sent stay, in order."""
    path = Path(path)
    lines = _lines(path)
    if not lines:
        return ReplayResult(0, 0, None)
    sent, unreadable, error, restored = 0, 0, None, []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a crash mid-write: it cannot be sent, and must not block the rest
            with open(path.with_name(path.name + ".unreadable"), "a", encoding="utf-8") as bad:
                bad.write(line + "\n")
            print(f"warning: {path}: an unreadable spooled write moved to {path.name}.unreadable", file=sys.stderr)
            unreadable += 1
            continue
        try:
            write_restoring(registry, entry["method"], entry["args"], entry["kwargs"], restore, restored)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
        sent += 1
    rest = lines[sent + unreadable :]
    if rest:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(rest) + "\n", encoding="utf-8")
        tmp.replace(path)
    else:
        path.unlink(missing_ok=True)
    return ReplayResult(sent, len(lines), error, bool(restored), unreadable)


def _lines(path: Path) -> list[str]:
    """The spool's non-empty lines, read without following a symbolic link planted at its name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    with open(fd, encoding="utf-8", errors="replace") as fh:
        return [line for line in fh.read().splitlines() if line.strip()]
