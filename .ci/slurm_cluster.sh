#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (slurmctld + slurmd + munged) so CI can run the slurm/
# templates through a real `sbatch`. Idempotent: installs Debian's slurm-wlm and munge only when missing,
# rewrites the config only when it changed, starts only the daemons that are not running, and waits until
# the node accepts jobs. Needs root (CI runs as root) and Debian 12 (slurm-wlm 22.05).
#
#   .ci/slurm_cluster.sh            # install if needed, configure, start, wait for the node
#   .ci/slurm_cluster.sh --stop     # stop the daemons this script started
set -euo pipefail

NODE="$(hostname -s)"
CPUS="$(nproc)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages and starts slurmctld/slurmd as SlurmUser=root)"

pid_alive() {  # pid_alive PIDFILE: the pid in PIDFILE is a running process
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

if [[ "${1:-}" == "--stop" ]]; then
    for pidfile in "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid" /run/munge/munged.pid; do
        if pid_alive "$pidfile"; then kill "$(cat "$pidfile")"; log "stopped $(basename "$pidfile" .pid)"; fi
    done
    exit 0
fi

# 1. Packages (only when missing: the install is the slow part).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null; }
fi

# 2. munge: a key, then the daemon (as the munge user, as Debian runs it).
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
fi

# 3. slurm.conf: one node, this host, every CPU; no cgroups (containers rarely allow them).
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by .ci/slurm_cluster.sh: a one-node CI cluster.
ClusterName=ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
# Requeue (sbatch --requeue / scontrol requeue) is how preempted jobs come back.
JobRequeue=1
# Seconds between SIGTERM and SIGKILL: time for a checkpoint to land.
KillWait=30
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=60
SlurmdTimeout=60
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
restart=0
if ! cmp -s "$new_conf" "$CONF"; then
    log "writing $CONF"
    install -m 0644 "$new_conf" "$CONF"
    restart=1
fi
rm -f "$new_conf"
# Debian's slurm looks for cgroup.conf only with cgroup plugins; nothing else to write.

# 4. Daemons (restart them when the config changed).
if [[ "$restart" == 1 ]]; then
    for pidfile in "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid"; do
        if pid_alive "$pidfile"; then
            pid="$(cat "$pidfile")"; kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if ! pid_alive "$RUN_DIR/slurmctld.pid"; then log "starting slurmctld"; slurmctld; fi
if ! pid_alive "$RUN_DIR/slurmd.pid"; then log "starting slurmd"; slurmd; fi

# 5. Wait (bounded) until the controller answers and the node takes jobs.
for _ in $(seq 60); do scontrol ping >/dev/null 2>&1 && break; sleep 0.5; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer (see $LOG_DIR/slurmctld.log)"
for _ in $(seq 60); do
    state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)"
    case "$state" in
        idle*|mixed*|allocated*|completing*) break ;;
        down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle*|mixed*|allocated*|completing*) log "node $NODE is $state ($CPUS CPUs); sbatch is ready" ;;
    *) die "node $NODE is '${state:-unknown}', not taking jobs (see $LOG_DIR/slurmd.log, $LOG_DIR/slurmctld.log)" ;;
esac
