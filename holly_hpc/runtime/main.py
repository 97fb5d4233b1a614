"""`python -m holly_hpc.runtime.main EXPERIMENT_DIR TASK_INDEX`: run one task without submitit's pickles.

The entry point of the standalone sbatch scripts `holly-hpc sbatch` writes: the same TaskRunner as a
submitted job, so `sbatch job.sbatch` trains exactly the tasks `holly-hpc submit` would.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m holly_hpc.runtime.main EXPERIMENT_DIR TASK_INDEX", file=sys.stderr)
        return 2
    from .preemption import REQUEUE_EXIT_CODE
    from .task import TaskRunner

    # Under sbatch: one task per process, requeued by the script's wrapper on REQUEUE_EXIT_CODE (as submitted).
    TaskRunner(args[0], int(args[1]), shares_machine=False, requeue_code=REQUEUE_EXIT_CODE)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
