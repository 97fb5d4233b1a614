"""Preemption and time limits: SIGUSR2 asks the task to stop at the next step boundary, checkpoint there
and exit with a code that makes the *host side* requeue it.

Why not submitit's own handler: it checkpoints inside the signal handler (mid-step, so the state may be
half-updated) and requeues by calling `scontrol requeue` from the task, which fails inside an Apptainer
image without SLURM's client. Here the handler only sets a flag; the Trainer saves a consistent checkpoint
between steps; the process exits with REQUEUE_EXIT_CODE; the launcher's wrapper on the host (or the local
controller, for code 144) starts the task again, and it resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the SLURM wrapper requeues on it
LOCAL_REQUEUE_EXIT_CODE = 144  # submitit's local controller reruns the task on this code


class Preempted(Exception):
    """Raised by the Trainer after it saved the checkpoint of the step where the stop was requested."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped after step {step} on {signal_name}")
        self.step, self.signal_name = step, signal_name


class StopRequest:
    """A flag set by SIGUSR2; install() replaces submitit's handler for this process."""

    def __init__(self):
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        signal.signal(signal.SIGUSR2, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        print(f"caught {self.signal_name}: checkpointing at the end of this step, then requeueing", flush=True)


def exit_for_requeue() -> bool:
    """Leave the process so that whatever launched it starts it again. Returns False (and does not exit)
    when the task runs inside the submitting process (debug executor, tests): there is nothing to restart."""
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if executor not in ("local", "slurm") and not os.environ.get("HOLLY_SBATCH"):
        return False
    code = LOCAL_REQUEUE_EXIT_CODE if executor == "local" else REQUEUE_EXIT_CODE
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip submitit's result pickling: this attempt has no result, the next one will
