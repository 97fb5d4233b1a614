"""Stopping a task between two steps: SIGUSR2 (time limit) requeues it; SIGTERM and SIGINT (preemption,
scancel, `holly-hpc cancel`, Ctrl-C, shutdown) stop it. Either way it checkpoints at the next step
boundary first, so nothing trained is lost and a resubmission resumes from there.

Why not submitit's own handler: it checkpoints inside the signal handler (mid-step, so the state may be
half-updated) and requeues by calling `scontrol requeue` from the task, which fails inside an Apptainer
image without SLURM's client. Here the handler only sets a flag; the Trainer saves a consistent checkpoint
between steps; the process exits with REQUEUE_EXIT_CODE; the launcher's wrapper on the host (or the local
controller, for code 144) starts the task again, and it resumes from that checkpoint.

SIGTERM does not requeue: scancel sends it too, and a preempting SLURM requeues the job itself. A second
SIGTERM or SIGINT does not wait for the step to end.
"""

from __future__ import annotations

import os
import signal
import sys

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the SLURM wrapper requeues on it
LOCAL_REQUEUE_EXIT_CODE = 144  # submitit's local controller reruns the task on this code
REQUEUE_SIGNALS = ("SIGUSR2",)
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised by the Trainer after it saved the checkpoint of the step where the stop was requested."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped after step {step} on {signal_name}")
        self.step, self.signal_name = step, signal_name

    @property
    def requeue(self) -> bool:
        """SIGUSR2, or a stop that came from another rank (whose reason this rank cannot know)."""
        return self.signal_name in REQUEUE_SIGNALS or not self.signal_name.startswith("SIG")


class StopRequest:
    """A flag set by SIGUSR2, SIGTERM or SIGINT; install() replaces submitit's handlers for this process."""

    def __init__(self):
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopRequest:
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def uninstall(self) -> None:
        """Put back the handlers install() replaced (a debug run goes on in the submitting process)."""
        for signum, handler in getattr(self, "_previous", {}).items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and name != "SIGUSR2":
            raise KeyboardInterrupt(f"{name} again: stopping without waiting for the step to end")
        self.signal_name = self.signal_name or name
        then = "requeueing" if name in REQUEUE_SIGNALS else "stopping"
        print(f"caught {name}: checkpointing at the end of this step, then {then}", flush=True)


def exit_for_requeue(requeue_code: int | None) -> bool:
    """Leave the process with `requeue_code`, the code on which whatever launched it starts it again (each
    launcher has its own: Launcher.requeue_code). None: the task runs inside the submitting process (debug
    launcher, tests), there is nothing to restart; returns False and does not exit."""
    if requeue_code is None:
        return False
    _leave(requeue_code)
    return True  # not reached


def exit_stopped(signal_name: str, requeue_code: int | None) -> bool:
    """Leave the process after a stop (SIGTERM/SIGINT), with the shell's code for that signal and no
    traceback; False (no exit) inside the submitting process (requeue_code None, as above)."""
    if requeue_code is None:
        return False
    _leave(128 + signal.Signals[signal_name].value if signal_name in signal.Signals.__members__ else 1)
    return True  # not reached


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip submitit's result pickling: this attempt has no result, the next one will
