"""Expand a validated spec into its tasks: grid (cartesian product) x zip (parallel lists) x seeds.

Expansion is a pure function of the spec: the same spec always yields the same task order, seeds and
config hashes, which is what lets a resubmission recognise the tasks that already ran.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from typing import Any

MAX_TASKS = 10_000  # per experiment: beyond this, validation alone takes minutes and an array floods the queue

# A combination of sweep values: dotted key -> (value, path of that value in the spec, for errors).
Combination = dict[str, tuple[Any, tuple]]


def override_sets(sweep: dict) -> list[Combination]:
    """The distinct combinations of swept values, in a fixed order (grid keys as written, then zip)."""
    grid = sweep.get("grid") or {}
    zipped = sweep.get("zip") or {}
    grid_axes = [
        [(key, value, ("sweep", "grid", key, i)) for i, value in enumerate(values)] for key, values in grid.items()
    ]
    zip_rows: list[list] = [[]]
    if zipped:
        length = len(next(iter(zipped.values())))
        zip_rows = [
            [(key, values[i], ("sweep", "zip", key, i)) for key, values in zipped.items()] for i in range(length)
        ]
    combos = []
    for grid_choice in itertools.product(*grid_axes):
        for row in zip_rows:
            combos.append({key: (value, source) for key, value, source in (*grid_choice, *row)})
    return combos


def derive_seed(spec_seed: int, task_index: int) -> int:
    """A task's seed from (spec seed, task index): a hash, so neighbouring tasks get unrelated streams."""
    digest = hashlib.sha256(f"holly-hpc:{spec_seed}:{task_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of a task config (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Task:
    index: int
    overrides: dict[str, Any]
    replicate: int
    seed: int
    config: dict  # everything the task trains from, seed included
    config_hash: str

    @property
    def task_id(self) -> str:
        return f"{self.index:04d}-{self.config_hash[:8]}"

    @property
    def rel_dir(self) -> str:
        return f"tasks/{self.task_id}"

    def to_json(self) -> dict:
        return {**asdict(self), "task_id": self.task_id, "rel_dir": self.rel_dir}

    @classmethod
    def from_json(cls, data: dict) -> Task:
        return cls(**{k: data[k] for k in ("index", "overrides", "replicate", "seed", "config", "config_hash")})


def expand(spec) -> list[Task]:
    """Tasks of a validated spec (holly_hpc.spec.Spec), numbered from 0."""
    sweep = spec.resolved.get("sweep") or {}
    replicates = int(sweep.get("seeds", 1))
    spec_seed = int(spec.resolved["seed"])
    tasks = []
    for combo in override_sets(sweep):
        overrides = {key: value for key, (value, _) in combo.items()}
        base = spec.task_config(overrides)
        for replicate in range(replicates):
            index = len(tasks)
            seed = derive_seed(spec_seed, index)
            config = {**base, "seed": seed}
            tasks.append(Task(index, overrides, replicate, seed, config, config_hash(config)))
    return tasks
