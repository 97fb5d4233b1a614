#!/usr/bin/env bash
# Stop the dev cluster that up.sh started: slurmd, slurmctld, slurmdbd, mariadbd, munged, in that
# order, each by its pid file in the state folder (TERM, wait, then KILL), and remove the pid files.
# Idempotent; installed packages, configs, logs, accounting database and controller state stay, so the
# next up.sh continues where this one stopped (job ids keep counting).
#
#   bash slurm/devcluster/down.sh           # stop the daemons
#   bash slurm/devcluster/down.sh --purge   # also cancel all jobs first and delete the state folder
#                                             (job ids restart at 1, accounting history is gone)
# Environment: HOLLY_SLURM_DIR as for up.sh.
set -eEuo pipefail
# shellcheck disable=SC2154 # rc is set inside the trap
trap 'rc=$?; echo "holly-slurm: ERROR: down.sh failed (exit $rc) at line $LINENO: $BASH_COMMAND" >&2; exit $rc' ERR

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

if [[ ! -d "$S" ]]; then
    echo "holly-slurm: nothing to stop ($S does not exist)"
    exit 0
fi

exec 9>"$S/.lock"
flock -w 300 9 || { echo "holly-slurm: ERROR: another up.sh/down.sh holds $S/.lock" >&2; exit 1; }

if ((purge)) && daemon_pid slurmctld >/dev/null; then
    # Jobs' processes (slurmstepd and the job itself) outlive slurmd; end them while we still can.
    scancel --full --quiet --partition=debug 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
        sleep 0.1
    done
fi

for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[i]}"
done

if ((purge)); then
    if [[ -f "$S/.holly-slurm" ]]; then
        exec 9>&-
        rm -rf -- "$S"
        echo "holly-slurm: removed $S"
    else
        echo "holly-slurm: not removing $S: it has no .holly-slurm marker (not made by up.sh?)" >&2
        exit 1
    fi
fi
echo "holly-slurm: down"
