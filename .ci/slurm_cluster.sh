#!/usr/bin/env bash
# Start a two-node SLURM cluster on this machine (slurmctld + one slurmd per node + munged) so CI can run the
# slurm/ templates through a real `sbatch`, on one node or across two. Debian's slurm is built with
# MULTIPLE_SLURMD: each node is a `slurmd -N NAME` of its own, with its own port, spool, log and pid file, and a
# host alias (127.0.0.1 in /etc/hosts) so that the node names resolve like real hosts. Idempotent: installs
# Debian's slurm-wlm and munge only when missing, rewrites the config only when it changed, starts only the
# daemons that are not running, and waits until every node accepts jobs. Needs root (CI runs as root) and
# Debian 12 (slurm-wlm 22.05).
#
#   .ci/slurm_cluster.sh            # install if needed, configure, start, wait for the node
#   .ci/slurm_cluster.sh --stop     # stop the daemons this script started
set -euo pipefail

HOST="$(hostname -s)"
NODES=(detox-ci-1 detox-ci-2)  # node names; jobs default to one node, `sbatch --nodes=2` spans both
FIRST_PORT=17001               # slurmd port of the first node; the next node takes the next port
CPUS="$(nproc)"                # each node offers every CPU: the nodes share this machine
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
    for pidfile in "$RUN_DIR"/slurmd*.pid "$RUN_DIR/slurmctld.pid" /run/munge/munged.pid; do
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

# 3. Host aliases for the node names (the templates use the first node's name as the rendezvous host).
for node in "${NODES[@]}"; do
    grep -Eq "^127\.0\.0\.1[[:space:]].*\b$node\b" /etc/hosts || echo "127.0.0.1 $node" >>/etc/hosts \
        || die "cannot add the host alias '127.0.0.1 $node' to /etc/hosts (read-only?): the node names must resolve"
done

# 4. slurm.conf: the nodes on this host, every CPU each; no cgroups (containers rarely allow them).
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
node_lines=""
port="$FIRST_PORT"
for node in "${NODES[@]}"; do
    mkdir -p "$SPOOL_DIR/$node"
    node_lines+="NodeName=$node NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS State=UNKNOWN"$'\n'
    port=$((port + 1))
done
new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by .ci/slurm_cluster.sh: a two-node CI cluster on one machine (MULTIPLE_SLURMD).
ClusterName=ci
SlurmctldHost=$HOST
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
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
${node_lines}PartitionName=ci Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
restart=0
if ! cmp -s "$new_conf" "$CONF"; then
    log "writing $CONF"
    install -m 0644 "$new_conf" "$CONF"
    restart=1
fi
rm -f "$new_conf"
# Debian's slurm looks for cgroup.conf only with cgroup plugins; nothing else to write.

# 5. Daemons (restart them when the config changed; slurmd.pid: a one-node cluster this script used to start).
if [[ "$restart" == 1 ]]; then
    for pidfile in "$RUN_DIR"/slurmd*.pid "$RUN_DIR/slurmctld.pid"; do
        if pid_alive "$pidfile"; then
            pid="$(cat "$pidfile")"; kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if ! pid_alive "$RUN_DIR/slurmctld.pid"; then log "starting slurmctld"; slurmctld; fi
for node in "${NODES[@]}"; do
    if ! pid_alive "$RUN_DIR/slurmd-$node.pid"; then log "starting slurmd -N $node"; slurmd -N "$node"; fi
done

# 6. Wait (bounded) until the controller answers and every node takes jobs.
for _ in $(seq 60); do scontrol ping >/dev/null 2>&1 && break; sleep 0.5; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer (see $LOG_DIR/slurmctld.log)"
for node in "${NODES[@]}"; do
    for _ in $(seq 60); do
        state="$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n1)"
        case "$state" in
            idle*|mixed*|allocated*|completing*) break ;;
            down*|drain*|fail*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    case "$state" in
        idle*|mixed*|allocated*|completing*) log "node $node is $state ($CPUS CPUs)" ;;
        *) die "node $node is '${state:-unknown}', not taking jobs (see $LOG_DIR/slurmd-$node.log, $LOG_DIR/slurmctld.log)" ;;
    esac
done
log "${#NODES[@]} nodes ready: sbatch is ready (sbatch --nodes=${#NODES[@]} spans them all)"
