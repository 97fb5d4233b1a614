"""The one training loop every task kind shares: resume, steps, logging, checkpoints, final outputs."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..launch.progress import format_left  # torch-free, shared with submit --wait
from .checkpoint import (
    list_checkpoints,
    newest_intact_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .distributed import DistInfo
from .kinds import TaskKind
from .outputs import (
    MetricsStore,
    TaskPaths,
    TensorBoardSink,
    chosen_hparams,
    scalar_tags,
    write_json_atomic,
)
from .preemption import Preempted, StopRequest


class RegistryReporter:
    """Registry writes for one run, batched: metrics are buffered and sent with a heartbeat at most every
    `flush_s` seconds (and at the end), so a thousand array tasks make few, short connections. The registry
    given is normally a SpooledRegistry: a database outage never stops training."""

    def __init__(self, registry, experiment: str, task_index: int, flush_s: float = 10.0):
        self.registry, self.experiment, self.task_index = registry, experiment, task_index
        self.flush_s = flush_s
        self._rows: list[tuple] = []
        self._last: tuple[int, float | None] | None = None  # step and loss of the newest log
        self._flushed_at = time.time()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.registry is None:
            return
        now = time.time()
        self._rows += [(step, k, float(v), now) for k, v in metrics.items()]
        self._last = (step, metrics.get("loss"))
        if now - self._flushed_at >= self.flush_s:
            self.flush()

    def note(self, message: str) -> None:
        if self.registry is not None:
            self.registry.note(self.experiment, self.task_index, message)

    def flush(self) -> None:
        if self.registry is None or self._last is None:
            return
        rows, self._rows = self._rows, []
        if rows:
            self.registry.log_metrics(self.experiment, self.task_index, rows)
        self.registry.heartbeat(self.experiment, self.task_index, *self._last)
        self._flushed_at = time.time()


# Several ranks agree on a stop request (see Trainer._stop_agreed) at least every STOP_CHECK_SECONDS, and at
# most every STOP_CHECK_MAX_STEPS steps. scancel's SIGKILL follows SIGTERM after KillWait (30 s by default) and
# SIGUSR2 comes SIGNAL_DELAY_S (90 s) before the time limit: a stop is noticed well within both.
STOP_CHECK_SECONDS = 5.0
STOP_CHECK_MAX_STEPS = 10


@dataclass
class TrainResult:
    completed: bool  # False when stopped early by stop_after_step
    step: int
    final_metrics: dict[str, float] | None


class Trainer:
    def __init__(
        self,
        kind: TaskKind,
        config: dict,
        paths: TaskPaths,
        reporter: RegistryReporter | None = None,
        label: str = "task",
        out: TextIO | None = None,
        stop: StopRequest | None = None,
        dist: DistInfo | None = None,
        hparam_keys: list[str] | None = None,
    ):
        self.kind, self.config, self.paths = kind, config, paths.make()
        self.stop, self.dist = stop or StopRequest(), dist or DistInfo()
        self.reporter = reporter or RegistryReporter(None, "", 0)
        self.label, self.out = label, out or sys.stdout
        self.hparam_keys = hparam_keys  # the keys the sweep varies (None: every key of the config)
        train = config["train"]
        self.steps, self.log_every = train["steps"], train["log_every"]
        self.checkpoint_every, self.keep = train["checkpoint_every"], train["keep_checkpoints"]
        self.step = 0  # steps completed
        self.clock = time.monotonic  # paces the ranks' stop agreements (a test may drive it)
        self._next_agreement = 1  # the step after which the ranks next agree on stopping
        self._agreed = (0, 0.0)  # (step, clock) of the last agreement

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None  # one writer: every rank holds the same state
        payload = {
            "step": self.step,
            "kind": self.kind.state_dict(),
            "rng": rng_state(),
            "config_seed": self.config["seed"],
        }
        return save_checkpoint(self.paths.checkpoints, self.step, payload, self.keep)

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint; a corrupt newer one (a truncated write, a damaged disk)
        is moved aside and recorded, never fatal: training goes back to the last good step, or to step 0."""
        had = bool(list_checkpoints(self.paths.checkpoints))

        def corrupt(path: Path, aside: Path | None, why: str) -> None:
            moved = f"; moved to {aside.name}" if aside else ""
            self._report(f"checkpoint {path} is corrupt ({why}){moved}")

        found = newest_intact_checkpoint(self.paths.checkpoints, corrupt, move_aside=self.dist.is_main)
        if found is None:
            if had:
                self._report("no intact checkpoint left: starting over from step 0")
            return False
        path, payload = found
        self.kind.load_state_dict(payload["kind"])
        set_rng_state(payload["rng"])
        self.step = payload["step"]
        self._print(f"resumed from {path.name} (step {self.step})")
        return True

    # ---------------------------------------------------------------- loop
    def _report(self, message: str) -> None:
        """Something the user must hear of: printed, on stderr too, and an event in the registry."""
        if not self.dist.is_main:
            return
        self._print(message)
        print(f"[{self.label}] {message}", file=sys.stderr, flush=True)
        self.reporter.note(message)

    def _print(self, message: str) -> None:
        if not self.dist.is_main:
            return
        print(f"[{self.label}] {message}", file=self.out, flush=True)

    def _stop_agreed(self, boundary: bool) -> bool:
        """Whether to stop after this step. One rank reads its own flag every step (free). Several ranks must
        agree, which is an all-reduce, a device sync, so they do not agree every step: at checkpoint
        boundaries, and at agreements spaced by the step time, every step when steps are slow (at least every
        STOP_CHECK_SECONDS) and at most STOP_CHECK_MAX_STEPS apart when they are fast. Each agreement also
        settles when the next one is (the smallest of the ranks' proposals), so every rank calls the collective
        at the same steps. All stop together and the checkpoint is written where they stop: a resumed run
        continues exactly."""
        if not self.dist.active:
            return self.stop.requested
        if not boundary and self.step < self._next_agreement:
            return False
        now = self.clock()
        seconds_per_step = (now - self._agreed[1]) / max(self.step - self._agreed[0], 1)
        proposal = max(1, min(STOP_CHECK_MAX_STEPS, int(STOP_CHECK_SECONDS / max(seconds_per_step, 1e-9))))
        stop, every = self.dist.agree(self.stop.requested, proposal)
        self._agreed, self._next_agreement = (self.step, now), self.step + every
        return stop

    def _describe_data(self, tb: TensorBoardSink) -> None:
        """Say what data the kind read before any step, as a log line per fact, data/ files and a TB text."""
        lines = self.kind.data_report()
        for line in lines:
            self._print(line)
        self.kind.write_data_files(self.paths.data)
        if lines:
            tb.text("data/summary", self.step, "\n\n".join(lines))

    def run(self, stop_after_step: int | None = None) -> TrainResult:
        """Train to train.steps (or stop, with a checkpoint, after `stop_after_step`, to simulate preemption)."""
        self.resume()
        n_logs = self.steps // self.log_every
        main = self.dist.is_main
        store = MetricsStore(self.paths.zarr, n_logs) if main else None
        tb = TensorBoardSink(self.paths.tb) if main else None
        try:
            if main:
                self._describe_data(tb)
            t0, first = time.time(), self.step
            self._agreed, self._next_agreement = (self.step, self.clock()), self.step + 1
            while self.step < self.steps:
                metrics = self.kind.train_step(self.step)
                self.step += 1
                if self.step % self.log_every == 0 and main:
                    metrics = {k: float(v) for k, v in metrics.items()}  # kinds may return tensors
                    evaluation = self.kind.evaluate()
                    tb.scalars(self.step, scalar_tags(metrics, evaluation))
                    metrics.update(evaluation)
                    for tag, image in self.kind.image_grids().items():
                        tb.image(tag, self.step, image)
                    for tag, points in self.kind.point_clouds().items():
                        tb.point_cloud(tag, self.step, points)
                    for tag, values in self.kind.histograms().items():
                        tb.histogram(tag, self.step, values)
                    store.write(self.step // self.log_every - 1, self.step, metrics)
                    self.reporter.log(self.step, metrics)
                    rate = (self.step - first) / max(time.time() - t0, 1e-9)
                    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    self._print(
                        f"step {self.step}/{self.steps}  {shown}  {rate:.1f} steps/s  "
                        f"eta {format_left((self.steps - self.step) / max(rate, 1e-9))}"
                    )
                stopping = stop_after_step is not None and stop_after_step <= self.step < self.steps
                boundary = self.step % self.checkpoint_every == 0 or self.step == self.steps
                preempted = self.step < self.steps and self._stop_agreed(boundary or stopping)
                if (boundary or stopping or preempted) and self.save() is not None:
                    self.kind.on_checkpoint(self.step, store)
                if preempted:
                    self._print(f"checkpointed step {self.step} after {self.stop.signal_name or 'a stop request'}")
                    raise Preempted(self.step, self.stop.signal_name or "a stop request on another rank")
                if stopping:
                    return TrainResult(False, self.step, None)
            if not main:
                return TrainResult(True, self.step, None)
            final = self.kind.write_outputs(self.paths.final, store)
            for tag, image in self.kind.final_images().items():
                tb.image(tag, self.step, image)
            for tag, view in self.kind.projector().items():
                tb.embedding(tag, self.step, view["embeddings"], view.get("labels"), view.get("thumbnails"))
            tb.hparams(chosen_hparams(self.config, self.hparam_keys), final, self.step)
            write_json_atomic(self.paths.final / "metrics.json", {"step": self.step, **final})
            self._print("done  " + "  ".join(f"{k} {v:.4g}" for k, v in final.items()))
            for line in self.kind.final_report():
                self._print(line)
            return TrainResult(True, self.step, final)
        finally:
            self.reporter.flush()
            if tb is not None:
                tb.close()
