"""Is the process that a registry row names still the one running? A pid alone cannot tell: after the task
died its number may be reused. The kernel's boot id and the process's start time (in clock ticks since
boot, field 22 of /proc/PID/stat) identify one process for the life of the machine."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of /proc/PID/stat (state first), or None if there is no such process. The command name
    (field 2) is in parentheses and may hold spaces and parentheses: split after the last ')'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def process_identity(pid: int | None = None) -> str | None:
    """'<boot id>:<start ticks>' of `pid` (default: this process), or None if it does not exist (or /proc
    is not there, e.g. macOS: then nothing is ever declared lost)."""
    fields = stat_fields(os.getpid() if pid is None else pid)
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        return None
    return None if fields is None else f"{boot}:{fields[19]}"  # field 22 overall = index 19 after pid and comm


def is_alive(pid: int, identity: str | None) -> bool | None:
    """True if `pid` is the process with `identity`, False if that process is gone, None if this machine
    cannot tell (/proc is missing, or no identity was recorded and some process has that pid now)."""
    if not _BOOT_ID.exists():
        return None
    if not identity:  # an attempt recorded before identities were: only a vanished pid is certain
        return False if not Path(f"/proc/{pid}").exists() else None
    now = process_identity(pid)
    if now is None:
        return False
    if now == identity:
        fields = stat_fields(pid)
        return fields is not None and fields[0] not in ("Z", "X")  # a zombie has ended; its parent has not reaped it
    return False


def this_host() -> str:
    return socket.gethostname()


def stop_process(pid: int, identity: str | None, grace_s: float, poll_s: float = 0.2) -> str:
    """SIGTERM to `pid`, then SIGKILL after `grace_s` if it has not ended; returns what happened:
    'ended' (after SIGTERM), 'killed' (needed SIGKILL), 'gone' (had already ended) or 'unknown'."""
    alive = is_alive(pid, identity)
    if alive is None:
        return "unknown"  # never signal a pid that may now belong to someone else
    if not alive:
        return "gone"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "gone"
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if is_alive(pid, identity) is False:
            return "ended"
        time.sleep(poll_s)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "ended"
    for _ in range(50):
        if is_alive(pid, identity) is False:
            return "killed"
        time.sleep(poll_s)
    return "unknown"
