"""The experiment folder: the frozen spec and plan that every job re-reads.

<output_root>/<experiment>/
    spec.yaml     the spec exactly as submitted
    plan.json     the expanded tasks (configs, seeds, hashes), registry URL and launch settings
    submitit/     submitit's pickles and per-job stdout/stderr
    tasks/<NNNN-hash>/   one folder per task (see runtime/outputs.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .io import resolve_path
from .sweep import Task

PLAN = "plan.json"
FROZEN_SPEC = "spec.yaml"


class ExperimentMismatch(Exception):
    """The spec expands to different tasks than the ones already frozen under that experiment name."""


class UnsafePath(ValueError):
    """An output path that would land outside its root: an absolute part, '..', or a symbolic link."""


def inside(root: Path, rel: str | Path) -> Path:
    """root / rel, refused unless it stays inside root: `rel` is relative, has no '..', and no part of it
    that exists is a symbolic link (someone who can write to a shared output root could otherwise point
    an experiment, a task folder or its checkpoints at any folder the submitting user may write)."""
    rel = Path(rel)
    if rel.is_absolute() or not rel.parts or any(part in ("..", ".") for part in rel.parts):
        raise UnsafePath(f"{rel}: expected a relative path inside {root}, without '..'")
    path = Path(root)
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise UnsafePath(
                f"{path} is a symbolic link (to {os.readlink(path)}): refused, outputs stay inside "
                f"{root} (move the folder there instead, or set output_root to where it points)"
            )
    return path


@dataclass
class Experiment:
    root: Path
    plan: dict

    @property
    def name(self) -> str:
        return self.plan["experiment"]

    @property
    def tasks(self) -> list[Task]:
        return [Task.from_json(t) for t in self.plan["tasks"]]

    def task(self, index: int) -> Task:
        return Task.from_json(self.plan["tasks"][index])

    def task_dir(self, index: int) -> Path:
        return inside(self.root, self.plan["tasks"][index]["rel_dir"])

    def folder(self, name: str) -> Path:
        """A folder of the experiment's own (submitit, slurm-logs, .slots), inside its root."""
        return inside(self.root, name)

    @property
    def registry_url(self) -> str:
        return self.plan["registry_url"]

    @property
    def launch(self) -> dict:
        return self.plan["launch"]

    @property
    def resources(self) -> dict:
        return self.plan["resources"]

    @property
    def container(self) -> dict | None:
        return self.plan.get("container")

    @property
    def spec_dir(self) -> Path:
        return Path(self.plan["spec_dir"])

    @property
    def submitit_dir(self) -> Path:
        return self.folder("submitit")

    @classmethod
    def load(cls, root: str | Path) -> Experiment:
        root = Path(root).resolve()
        path = root / PLAN
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no plan here; is {root} an experiment folder made by 'holly-hpc submit'?"
            ) from None
        return cls(root, plan)


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolved_container(spec) -> dict | None:
    """The spec's container section with its image path made absolute (relative paths are from the spec)."""
    container = spec.resolved.get("container")
    if not container:
        return None
    image = resolve_path(container["image"], spec.base_dir)
    # One taken from the spec's folder is normalised ('..', links); an absolute one is kept as written, so a
    # link to "the current image" stays a link.
    if not Path(container["image"]).expanduser().is_absolute():
        image = image.resolve()
    return {**container, "image": str(image)}


def build_plan(spec, tasks: list[Task], output_root: Path, registry_url: str) -> dict:
    return {
        "experiment": spec.experiment,
        "spec_file": str(spec.file.resolve()),
        "spec_dir": str(spec.base_dir),
        "spec_hash": spec_hash(spec.text),
        "output_root": str(output_root.resolve()),
        "registry_url": registry_url,
        "registry_flush_s": spec.resolved["registry"]["flush_seconds"],
        "launch": spec.resolved["launch"],
        "resources": spec.resolved["resources"],
        "container": resolved_container(spec),
        "tasks": [t.to_json() for t in tasks],
    }


def experiment_root(output_root: Path, name: str) -> Path:
    """<output_root>/<name>, resolved, refused if it is (or runs through) a symbolic link."""
    return inside(Path(output_root).resolve(), name)


def planned(spec, tasks: list[Task], output_root: Path, registry_url: str) -> Experiment:
    """The experiment as it will be frozen, in memory only: nothing is written, so everything that can
    fail is checked on it first. An experiment already frozen there must expand to the same tasks (same
    indices and config hashes): otherwise its finished tasks would be silently mixed with different ones.
    """
    root = experiment_root(output_root, spec.experiment)
    plan = build_plan(spec, tasks, output_root, registry_url)
    existing = root / PLAN
    plan["created"] = time.time()
    if existing.exists():
        old = json.loads(existing.read_text(encoding="utf-8"))
        old_ids = [t["task_id"] for t in old["tasks"]]
        new_ids = [t["task_id"] for t in plan["tasks"]]
        if old_ids != new_ids:
            changed = [
                i
                for i in range(max(len(old_ids), len(new_ids)))
                if i >= len(old_ids) or i >= len(new_ids) or old_ids[i] != new_ids[i]
            ]
            raise ExperimentMismatch(
                f"{root} already holds experiment '{spec.experiment}' with different tasks "
                f"({len(old_ids)} frozen, {len(new_ids)} now; task(s) {', '.join(map(str, changed[:10]))} differ). "
                f"Give the changed spec a new 'experiment' name, or move the old folder away."
            )
        plan["created"] = old.get("created", plan["created"])
    experiment = Experiment(root, plan)
    for index in range(len(tasks)):
        experiment.task_dir(index)  # refuses a task folder that is a symbolic link
    return experiment


def write_frozen(experiment: Experiment, spec_text: str) -> Experiment:
    """Write spec.yaml and plan.json under the experiment's root (atomically)."""
    experiment.root.mkdir(parents=True, exist_ok=True)
    _write_atomic(experiment.root / FROZEN_SPEC, spec_text)
    _write_atomic(experiment.root / PLAN, json.dumps(experiment.plan, indent=2, sort_keys=True) + "\n")
    return experiment


def freeze(spec, tasks: list[Task], output_root: Path, registry_url: str) -> Experiment:
    """planned() then write_frozen(): for callers with nothing else to check in between."""
    return write_frozen(planned(spec, tasks, output_root, registry_url), spec.text)


def register(registry, experiment: Experiment) -> None:
    """The experiment and its runs in the registry, from the frozen folder alone (idempotent: submit does it,
    and a task does it again when it finds its rows gone, e.g. a deleted SQLite file or a new database)."""
    from .provenance import provenance

    text = (experiment.root / FROZEN_SPEC).read_text(encoding="utf-8")
    registry.upsert_experiment(experiment.name, text, spec_hash(text), str(experiment.root), provenance(experiment))
    registry.upsert_runs(
        experiment.name,
        [
            {
                "task_index": t.index,
                "task_id": t.task_id,
                "config": json.dumps(t.config, sort_keys=True),
                "config_hash": t.config_hash,
                "seed": t.seed,
                "out_dir": str(experiment.root / t.rel_dir),
            }
            for t in experiment.tasks
        ],
    )


def restore_registry(registry, experiment: Experiment) -> None:
    """Schema, experiment and run rows again, for a registry that lost them while tasks ran."""
    registry.init()
    register(registry, experiment)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
