#!/usr/bin/env bash
# Start (or check) a real single-node SLURM cluster for tests and CI. Idempotent: when everything is
# already running with the current config and the node is usable, it does nothing and exits 0.
#
#   bash slurm/devcluster/up.sh && source slurm/devcluster/env.sh
#
# Needs root on Debian 12 (installs slurmctld slurmd slurm-client slurmdbd munge mariadb-server if
# missing). Starts, without systemd, each writing a pid file into the state folder:
#   munged (as munge) -> mariadbd (as mysql, unix socket only) -> slurmdbd -> slurmctld -> slurmd
# Environment:
#   HOLLY_SLURM_DIR              state folder (default /tmp/holly-slurm): etc/ run/ log/ state/ mysql/ munge/
#   HOLLY_SLURM_MAX_ARRAY_SIZE   MaxArraySize (default 1001); a change restarts slurmctld and slurmd
#   HOLLY_SLURM_CRED_EXPIRE      AuthInfo cred_expire in seconds (default: Slurm's 120), which is also
#                                how long a requeued job waits before it may start again
#   HOLLY_SLURM_WAIT             seconds to wait for each daemon / the test job (default 60)
set -eEuo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

MAX_ARRAY_SIZE="${HOLLY_SLURM_MAX_ARRAY_SIZE:-1001}"
CRED_EXPIRE="${HOLLY_SLURM_CRED_EXPIRE:-}"
WAIT="${HOLLY_SLURM_WAIT:-60}"
CLUSTER=holly
PARTITION=debug
NGPUS=2
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=holly-slurm-dev # the database listens on a unix socket in the state folder only
MUNGE_SOCKET="$S/munge/munge.socket.2"
MYSQL_SOCKET="$S/mysql/mysqld.sock"

t_start=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - $1) / 1000000 ))" | awk '{printf "%.1f", $1 / 1000}'; }
say() { echo "holly-slurm: $*"; }
fail() { # fail MESSAGE [LOGFILE]
    echo "holly-slurm: ERROR: $1" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        echo "---- last 30 lines of $2 ----" >&2
        tail -n 30 "$2" >&2
        echo "----" >&2
    fi
    exit 1
}
trap 'rc=$?; echo "holly-slurm: ERROR: up.sh failed (exit $rc) at line $LINENO: $BASH_COMMAND" >&2; exit $rc' ERR

[[ "$(id -u)" == 0 ]] || fail "up.sh must run as root (it installs packages and starts daemons as root)"
[[ "$MAX_ARRAY_SIZE" =~ ^[0-9]+$ ]] || fail "HOLLY_SLURM_MAX_ARRAY_SIZE must be an integer, got '$MAX_ARRAY_SIZE'"
[[ -z "$CRED_EXPIRE" || "$CRED_EXPIRE" =~ ^[0-9]+$ ]] || fail "HOLLY_SLURM_CRED_EXPIRE must be an integer"
case "$S" in /*) ;; *) fail "HOLLY_SLURM_DIR must be an absolute path, got '$S'" ;; esac

# ---------------------------------------------------------------- packages (only when missing)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    t_install=$(date +%s%N)
    say "installing ${missing[*]} ..."
    # Keep the packages' maintainer scripts from starting the system-wide services (we start our own).
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    apt_log="$(mktemp /tmp/holly-slurm-apt.XXXXXX.log)"
    install_ok=1
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1; then
        # A fresh machine may have no package lists yet.
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$apt_log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1 || install_ok=0
    fi
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    ((install_ok)) || fail "apt-get install ${missing[*]} failed" "$apt_log"
    rm -f "$apt_log"
    say "installed packages in $(elapsed "$t_install") s"
fi

# ---------------------------------------------------------------- host facts
NODE="$(hostname -s)"
if ! getent hosts "$NODE" >/dev/null; then
    say "adding '127.0.0.1 $NODE' to /etc/hosts (the node name must resolve)"
    echo "127.0.0.1 $NODE" >>/etc/hosts
fi
CPUS="$(nproc)"
mem_total="$(free -m | awk '/^Mem:/ {print $2}')"
REAL_MEMORY=$((mem_total - (mem_total / 20 > 256 ? mem_total / 20 : 256)))
((REAL_MEMORY > 0)) || REAL_MEMORY=1
MAX_JOB_COUNT=$((MAX_ARRAY_SIZE * 10 > 10000 ? MAX_ARRAY_SIZE * 10 : 10000))

# Fake GPUs: character devices that behave like /dev/null, advertised as gres/gpu.
for ((i = 0; i < NGPUS; i++)); do
    [[ -c "/dev/holly-fakegpu$i" ]] || mknod -m 666 "/dev/holly-fakegpu$i" c 1 3 ||
        fail "cannot create fake GPU device /dev/holly-fakegpu$i (mknod needs CAP_MKNOD)"
done

# ---------------------------------------------------------------- state folder and config
mkdir -p "$S"/{etc,run,log,state/ctld,state/d,jobs}
touch "$S/.holly-slurm" # marks the folder as ours (down.sh --purge deletes only such folders)
install -d -o munge -g munge -m 0755 "$S/munge" # munged wants x for all on the socket folder
install -d -o mysql -g mysql -m 0750 "$S/mysql"

# Serialise concurrent up.sh/down.sh runs. fd 9 is closed for every daemon we start (9>&-), otherwise
# the daemons would inherit the lock and hold it forever.
exec 9>"$S/.lock"
flock -w 300 9 || fail "another up.sh/down.sh holds $S/.lock"

authinfo="socket=$MUNGE_SOCKET"
[[ -n "$CRED_EXPIRE" ]] && authinfo="$authinfo,cred_expire=$CRED_EXPIRE"
gpu_last=$((NGPUS - 1))

write_if_changed() { # write_if_changed FILE MODE < content; prints nothing
    local f="$1" mode="$2" tmp
    tmp="$(mktemp "$f.XXXXXX")"
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f "$f" ]] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; else mv -f "$tmp" "$f"; fi
}

write_if_changed "$S/etc/slurm.conf" 644 <<EOF
# Generated by slurm/devcluster/up.sh; edit up.sh, not this file.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=$authinfo
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$S/state/ctld
SlurmdSpoolDir=$S/state/d
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$(logfile_of slurmctld)
SlurmdLogFile=$(logfile_of slurmd)
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in this VM/container: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MaxArraySize=$MAX_ARRAY_SIZE
MaxJobCount=$MAX_JOB_COUNT
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=120
SlurmdTimeout=300
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# For slurmdbd connections the munge socket is taken from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$REAL_MEMORY Gres=gpu:$NGPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

write_if_changed "$S/etc/gres.conf" 644 <<EOF
# Generated by slurm/devcluster/up.sh: $NGPUS fake GPUs (clones of /dev/null).
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/holly-fakegpu[0-$gpu_last]
EOF

write_if_changed "$S/etc/slurmdbd.conf" 600 <<EOF
# Generated by slurm/devcluster/up.sh; edit up.sh, not this file.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdAddr=127.0.0.1
DbdHost=$NODE
DbdPort=6819
SlurmUser=root
PidFile=$S/run/slurmdbd.pid
LogFile=$(logfile_of slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF

# The config a daemon runs with is recorded in run/NAME.cfg when it starts; a daemon whose recorded
# config differs from the generated one is restarted.
cfg_of() {
    case "$1" in
        slurmctld | slurmd) cat "$S/etc/slurm.conf" "$S/etc/gres.conf" | sha256sum | cut -d' ' -f1 ;;
        slurmdbd) sha256sum <"$S/etc/slurmdbd.conf" | cut -d' ' -f1 ;;
        *) echo static ;;
    esac
}

# ---------------------------------------------------------------- health of what is running
node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }
node_usable() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing|planned)$ ]]; }
cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }

declare -A running=()
restart=()
for d in "${DAEMONS[@]}"; do
    if daemon_pid "$d" >/dev/null; then
        if [[ "$(cat "$S/run/$d.cfg" 2>/dev/null)" == "$(cfg_of "$d")" ]]; then
            running[$d]=1
        else
            restart+=("$d")
        fi
    fi
done
if ((${#running[@]} == ${#DAEMONS[@]})) && node_usable && cluster_registered; then
    say "already running and healthy (node $NODE $(node_state), MaxArraySize=$MAX_ARRAY_SIZE, state in $S)"
    exit 0
fi
if ((${#restart[@]})); then
    say "config changed for ${restart[*]}: restarting"
    # slurmd depends on slurmctld's config too: restart both together.
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d="${DAEMONS[i]}"
        if [[ " ${restart[*]} " == *" $d "* ]] || { [[ "$d" == slurmd && " ${restart[*]} " == *" slurmctld "* ]]; }; then
            stop_daemon "$d"
            unset "running[$d]"
        fi
    done
fi

wait_for() { # wait_for DESCRIPTION DAEMON COMMAND... (fails early if DAEMON has died)
    local what="$1" name="$2" deadline=$((SECONDS + WAIT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        daemon_pid "$name" >/dev/null || fail "$name died while waiting for $what" "$(logfile_of "$name")"
        ((SECONDS < deadline)) || fail "timed out after ${WAIT}s waiting for $what" "$(logfile_of "$name")"
        sleep 0.2
    done
}

# Start in a fresh session, detached from our stdin/stdout/stderr (a caller capturing up.sh's output
# through a pipe must not wait for the daemons), and without our lock fd. Then wait until its pid file
# names a live process; fail at once if the launcher exits non-zero, or if it exits 0 (daemonised) and
# no live daemon shows up within a few seconds.
spawn() { # spawn NAME COMMAND...
    local name="$1" launcher rc deadline=$((SECONDS + WAIT)) gone_at=""
    shift
    setsid "$@" </dev/null >>"$(logfile_of "$name")" 2>&1 9>&- &
    launcher=$!
    until daemon_pid "$name" >/dev/null; do
        if [[ -z "$gone_at" ]] && ! alive "$launcher"; then
            rc=0
            wait "$launcher" || rc=$?
            ((rc == 0)) || fail "$name exited with status $rc while starting" "$(logfile_of "$name")"
            gone_at=$SECONDS
        fi
        [[ -z "$gone_at" ]] || ((SECONDS - gone_at < 10)) || fail "$name daemonised but is not running (pid file $(pidfile_of "$name"))" "$(logfile_of "$name")"
        ((SECONDS < deadline)) || fail "timed out after ${WAIT}s waiting for $name to start" "$(logfile_of "$name")"
        sleep 0.1
    done
}

started=()
record_started() { cfg_of "$1" >"$S/run/$1.cfg"; started+=("$1"); }

# ---------------------------------------------------------------- munged
if [[ -z "${running[munged]:-}" ]]; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key; else create-munge-key -f; fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    log="$(logfile_of munged)"
    touch "$log" && chown munge:munge "$log" && chmod 0640 "$log"
    rm -f "$(pidfile_of munged)"
    spawn munged runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" \
        --pid-file="$(pidfile_of munged)" --log-file="$log" --seed-file="$S/munge/munged.seed"
    wait_for "munged to answer" munged sh -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"
    record_started munged
fi

# ---------------------------------------------------------------- mariadbd
# shellcheck disable=SC2120 # called with arguments through wait_for
mysql_root() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root "$@"; }
if [[ -z "${running[mariadbd]:-}" ]]; then
    log="$(logfile_of mariadbd)"
    touch "$log" && chown mysql:mysql "$log"
    if [[ ! -d "$S/mysql/data/mysql" ]]; then
        say "initialising MariaDB datadir $S/mysql/data"
        rm -rf "$S/mysql/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$S/mysql/data" \
            --auth-root-authentication-method=socket --skip-test-db >>"$log" 2>&1 ||
            fail "mariadb-install-db failed" "$log"
    fi
    rm -f "$(pidfile_of mariadbd)" "$MYSQL_SOCKET"
    spawn mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$S/mysql/data" \
        --socket="$MYSQL_SOCKET" --pid-file="$(pidfile_of mariadbd)" --skip-networking \
        --log-error="$log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
        --innodb-log-file-size=64M --max-allowed-packet=64M
    wait_for "mariadbd to accept connections" mariadbd mysql_root -e 'SELECT 1'
    # shellcheck disable=SC2119
    mysql_root >>"$log" 2>&1 <<SQL || fail "creating the accounting database failed" "$log"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
    record_started mariadbd
fi

# ---------------------------------------------------------------- slurmdbd
if [[ -z "${running[slurmdbd]:-}" ]]; then
    log="$(logfile_of slurmdbd)"
    rm -f "$(pidfile_of slurmdbd)"
    # slurmdbd.conf is read from SLURM_CONF's folder; the MySQL client library finds the socket
    # through MYSQL_UNIX_PORT (slurmdbd.conf has no socket option).
    spawn slurmdbd env MYSQL_UNIX_PORT="$MYSQL_SOCKET" /usr/sbin/slurmdbd
    wait_for "slurmdbd to answer sacctmgr" slurmdbd sacctmgr -n -P list cluster format=cluster
    record_started slurmdbd
fi
if ! cluster_registered; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster $CLUSTER failed" "$(logfile_of slurmdbd)"
    say "registered cluster '$CLUSTER' in the accounting database"
fi

# ---------------------------------------------------------------- slurmctld
if [[ -z "${running[slurmctld]:-}" ]]; then
    log="$(logfile_of slurmctld)"
    rm -f "$(pidfile_of slurmctld)"
    spawn slurmctld /usr/sbin/slurmctld
    wait_for "slurmctld to answer" slurmctld sh -c 'scontrol ping | grep -q UP'
    record_started slurmctld
fi

# ---------------------------------------------------------------- slurmd
if [[ -z "${running[slurmd]:-}" ]]; then
    log="$(logfile_of slurmd)"
    rm -f "$(pidfile_of slurmd)"
    spawn slurmd /usr/sbin/slurmd -N "$NODE"
    record_started slurmd
fi

# ---------------------------------------------------------------- node usable?
deadline=$((SECONDS + WAIT))
resumed=0
until node_usable; do
    st="$(node_state)"
    if ((!resumed)) && [[ "$st" =~ ^(down|drain|drained|draining|fail) ]]; then
        say "node $NODE is '$st'; asking slurmctld to resume it"
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        resumed=1
    fi
    if ((SECONDS >= deadline)); then
        scontrol show node "$NODE" >&2 || true
        fail "node $NODE is '${st:-unknown}' after ${WAIT}s, not idle" "$(logfile_of slurmd)"
    fi
    sleep 0.2
done

# ---------------------------------------------------------------- trivial job through the whole chain
if ((${#started[@]})); then
    t_job=$(date +%s%N)
    jobid="$(cd "$S/jobs" && sbatch --parsable -J holly-devcluster-check -p "$PARTITION" -o /dev/null -e /dev/null --wrap true)" ||
        fail "sbatch of the check job failed" "$(logfile_of slurmctld)"
    jobid="${jobid%%;*}"
    deadline=$((SECONDS + WAIT))
    while :; do
        st="$(sacct -j "$jobid" -X -n -P -o State 2>/dev/null | head -n1)"
        [[ "$st" == COMPLETED ]] && break
        case "$st" in FAILED* | CANCELLED* | TIMEOUT* | NODE_FAIL* | OUT_OF_ME* | BOOT_FAIL* | DEADLINE* | PREEMPTED*)
            fail "check job $jobid ended $st" "$(logfile_of slurmd)" ;;
        esac
        ((SECONDS < deadline)) || fail "check job $jobid not COMPLETED in sacct after ${WAIT}s (state '${st:-none}')" "$(logfile_of slurmctld)"
        sleep 0.2
    done
    say "check job $jobid COMPLETED in $(elapsed "$t_job") s"
fi

say "cluster '$CLUSTER' up in $(elapsed "$t_start") s (started: ${started[*]:-nothing}; node $NODE: CPUs=$CPUS RealMemory=$REAL_MEMORY gpu:$NGPUS; MaxArraySize=$MAX_ARRAY_SIZE)"
say "state in $S; clients: source $(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
