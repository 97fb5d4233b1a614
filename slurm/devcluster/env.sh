# shellcheck shell=sh
# Source this file (bash/zsh/sh) to point SLURM clients at the dev cluster that up.sh started:
#
#     source slurm/devcluster/env.sh
#     sinfo; sbatch --wrap 'echo hi'; squeue; sacct; scancel; scontrol show config
#
# The cluster keeps everything (configs, pid files, logs, state, the MariaDB datadir) in one state
# folder, $HOLLY_SLURM_DIR (default /tmp/holly-slurm); nothing is written to /etc/slurm. Clients find the
# generated slurm.conf through SLURM_CONF, and jobs inherit it (sbatch exports the environment).

HOLLY_SLURM_DIR="${HOLLY_SLURM_DIR:-/tmp/holly-slurm}"
export HOLLY_SLURM_DIR
export SLURM_CONF="$HOLLY_SLURM_DIR/etc/slurm.conf"
