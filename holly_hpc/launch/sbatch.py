"""`holly-hpc sbatch`: standalone, readable sbatch array scripts for users who submit by hand.

The experiment is frozen and registered exactly as `holly-hpc submit` does, then one script per array
(more than one only when the tasks exceed the cluster's MaxArraySize) is written from
slurm/array.sbatch.template.
"""

from __future__ import annotations

import shlex
import string
import sys
from pathlib import Path

from ..runtime.preemption import REQUEUE_EXIT_CODE
from .slurm import SIGNAL_DELAY_S, chunks, extra_options, refuse_unsafe, resource_options, sbatch_flag


def template_path() -> Path:
    """slurm/array.sbatch.template: inside the installed package (wheel) or at the checkout's root."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "slurm" / "array.sbatch.template", package.parent / "slurm" / "array.sbatch.template"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("slurm/array.sbatch.template not found beside holly_hpc")


def directives(experiment, first: int, count: int) -> list[str]:
    """#SBATCH lines from the frozen experiment's resources and launch settings."""
    r, launch = experiment.resources, experiment.launch
    logs = experiment.folder("slurm-logs")
    # What submitit adds by itself for `holly-hpc submit`, written out here, then the same resource options.
    options = {
        "job_name": f"holly-{experiment.name}",
        "array": f"0-{count - 1}%{min(count, launch['array_parallelism'])}",
        **resource_options(r),
        "output": str(logs / "%A_%a.out"),
        "error": str(logs / "%A_%a.err"),
        "open_mode": "append",
        "signal": f"USR2@{SIGNAL_DELAY_S}",
        **extra_options(r),
    }
    refuse_unsafe(options)
    return [sbatch_flag(option, value) for option, value in options.items()]


def render_scripts(experiment, indices: list[int], output: Path, max_array: int) -> list[tuple[Path, str]]:
    """(path, text) of one script per array of at most `max_array` tasks; nothing is written."""
    template = string.Template(template_path().read_text(encoding="utf-8"))
    python = shlex.quote(sys.executable)
    if experiment.container:
        from .apptainer import container_python

        python = container_python(experiment.container, gpus=experiment.resources["gpus_per_node"] > 0)
    parts = chunks(indices, max_array)
    scripts = []
    for n, part in enumerate(parts):
        if part != list(range(part[0], part[0] + len(part))):
            raise ValueError("sbatch scripts cover contiguous task indices")
        path = output if len(parts) == 1 else output.with_name(f"{output.stem}.{n}{output.suffix}")
        values = {
            "experiment": experiment.name,
            "first": part[0],
            "last": part[-1],
            "total": len(experiment.plan["tasks"]),
            "script": path.name,
            "experiment_dir": experiment.root,
            "experiment_dir_q": shlex.quote(str(experiment.root)),
            "directives": "\n".join(directives(experiment, part[0], len(part))),
            "offset": part[0],
            "python": python,
            "requeue_code": REQUEUE_EXIT_CODE,
        }
        # The header comments hold the name, folder and script file as they are: none may break its line.
        refuse_unsafe({k: v for k, v in values.items() if k != "directives"})
        scripts.append((path, template.substitute(values)))
    return scripts


def write_scripts(scripts: list[tuple[Path, str]], experiment) -> list[Path]:
    """Write what render_scripts made (executable) and the folder their logs go to."""
    for path, text in scripts:
        path.write_text(text, encoding="utf-8")
        path.chmod(0o755)
    experiment.folder("slurm-logs").mkdir(exist_ok=True)
    return [path for path, _ in scripts]
