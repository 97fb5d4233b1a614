# Shared by up.sh and down.sh (not meant to be sourced by users; use env.sh for that).
# shellcheck shell=bash

_devcluster_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$_devcluster_dir/env.sh"
S="$HOLLY_SLURM_DIR"

# The daemons up.sh starts, in start order (down.sh stops them in reverse order).
# shellcheck disable=SC2034 # used by up.sh and down.sh
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

# munged and mariadbd drop privileges and write their own pid files, so theirs live in folders owned
# by their users; the slurm daemons run as root and write to $S/run.
pidfile_of() {
    case "$1" in
        munged) echo "$S/munge/munged.pid" ;;
        mariadbd) echo "$S/mysql/mariadbd.pid" ;;
        *) echo "$S/run/$1.pid" ;;
    esac
}

logfile_of() { echo "$S/log/$1.log"; }

# A process that has exited but not yet been reaped (a zombie; this machine's init reaps slowly) counts
# as gone.
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# Prints the pid of the daemon if its pid file names a live process of that name; fails otherwise.
# (Checking /proc/PID/comm keeps a recycled pid from being mistaken for, or killed as, a daemon.)
daemon_pid() {
    local f pid comm
    f="$(pidfile_of "$1")"
    [[ -s "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" ]] || return 1
    alive "$pid" || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$1" ]] || return 1
    echo "$pid"
}

# TERM, wait (mariadbd gets longer: it flushes InnoDB), then KILL; removes the pid file.
stop_daemon() {
    local name="$1" pid i limit=20 t0=${EPOCHREALTIME/./}
    [[ "$name" == mariadbd ]] && limit=60
    if pid="$(daemon_pid "$name")"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < limit * 10; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            echo "holly-slurm: $name (pid $pid) ignored TERM for ${limit}s, sending KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                alive "$pid" || break
                sleep 0.1
            done
        fi
        echo "holly-slurm: stopped $name (pid $pid) in $(((${EPOCHREALTIME/./} - t0) / 1000)) ms"
    fi
    rm -f "$(pidfile_of "$name")" "$S/run/$name.cfg"
}
