"""Registry writes that survive a database outage.

A task writes through SpooledRegistry. A write that fails is appended to <task dir>/registry-spool.jsonl
and training goes on; before the next write, and at task end, the spool is replayed in order. Every
write is idempotent (natural keys, ON CONFLICT, client-side timestamps), so a replay that is itself
interrupted and repeated adds nothing twice. `holly-hpc registry sync` replays spools left behind by
tasks that ended while the database was still away.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SPOOL_FILE = "registry-spool.jsonl"
WRITES = ("start_attempt", "end_attempt", "set_state", "heartbeat", "log_metrics", "finish")


class SpooledRegistry:
    def __init__(self, registry, spool_path: Path, label: str = "task"):
        self.registry, self.spool_path, self.label = registry, Path(spool_path), label
        self._warned = False

    def __getattr__(self, name):
        if name not in WRITES:
            return getattr(self.registry, name)  # reads go straight to the database
        return lambda *args, **kwargs: self._write(name, args, kwargs)

    def _write(self, method: str, args: tuple, kwargs: dict):
        if method in ("start_attempt", "heartbeat", "end_attempt", "set_state", "finish") and "at" not in kwargs:
            kwargs = {**kwargs, "at": time.time()}  # the moment it happened, kept through a replay
        if self.pending() and not self.replay():
            self._append(method, args, kwargs)
            return None
        try:
            return getattr(self.registry, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any database failure: keep the write for later
            self._append(method, args, kwargs)
            if not self._warned:
                print(f"[{self.label}] registry unavailable ({exc}); spooling to {self.spool_path}, training goes on",
                      file=sys.stderr, flush=True)
                self._warned = True
            return None

    def _append(self, method: str, args: tuple, kwargs: dict) -> None:
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"method": method, "args": list(args), "kwargs": kwargs}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def pending(self) -> int:
        if not self.spool_path.exists():
            return 0
        return sum(1 for line in self.spool_path.read_text(encoding="utf-8").splitlines() if line.strip())

    def replay(self) -> bool:
        """Send the spooled writes in order; True when the spool is empty afterwards."""
        return replay_spool(self.registry, self.spool_path)


def replay_spool(registry, path: Path) -> bool:
    """Replay one spool file into `registry`; the lines that could not be sent stay, in order."""
    path = Path(path)
    if not path.exists():
        return True
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    sent = 0
    for line in lines:
        entry = json.loads(line)
        try:
            getattr(registry, entry["method"])(*entry["args"], **entry["kwargs"])
        except Exception:  # noqa: BLE001 - still down: keep this and everything after it
            break
        sent += 1
    rest = lines[sent:]
    if rest:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(rest) + "\n", encoding="utf-8")
        tmp.replace(path)
        return False
    path.unlink(missing_ok=True)
    return True
