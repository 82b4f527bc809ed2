#!/usr/bin/env bash
# One machine's share of a training/evaluation step; `srun` runs it once per machine (task) of the job:
#
#   srun --kill-on-bad-exit=1 bash slurm/task.sh MODULE [ARGS...]
#
# Rendezvous from SLURM's per-task variables: this task is machine $SLURM_PROCID of $SLURM_NTASKS (one task per
# node on a real cluster, so these equal $SLURM_NODEID and $SLURM_NNODES); the first node of the allocation
# ($MASTER_ADDR, exported by slurm/common.sh) hosts the rendezvous on $MASTER_PORT. Reads (from common.sh):
# REPO PYTHON DETOX_CPU PROCS_PER_MACHINE RESERVE_REWARD_GPU REWARD_SERVER REWARD_PORT(S) HEALTH_TIMEOUT
# ACCELERATE_CONFIG ACCELERATE_ARGS.
set -euo pipefail
cd "$REPO"
module="$1"; shift

machine_rank="${SLURM_PROCID:?run me with srun}"
num_machines="${SLURM_NTASKS:?run me with srun}"
launch=(--num_machines "$num_machines" --machine_rank "$machine_rank"
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
extra=()

if [[ "$DETOX_CPU" == 1 ]]; then
    procs="$PROCS_PER_MACHINE"
    if [[ -z "$ACCELERATE_CONFIG" ]]; then  # the flags of accelerate_configs/cpu_2proc.yaml
        launch+=(--mixed_precision no --dynamo_backend no)
        (( num_machines * procs > 1 )) && launch+=(--multi_gpu)
    fi
else
    # The last GPU of each node scores (reward server or in-process reward model), the others train.
    train_gpus="$("$PYTHON" slurm/launch_helpers.py gpus --role train --reserve-reward "$RESERVE_REWARD_GPU")"
    procs="$(awk -F, '{print NF}' <<<"$train_gpus")"
    if [[ "$RESERVE_REWARD_GPU" == 1 && "$REWARD_SERVER" == 0 ]]; then
        # In-process reward model on the reserved GPU: the trainers see it too and leave it to the reward model.
        extra+=(--reward.device "cuda:$procs")
    else
        export CUDA_VISIBLE_DEVICES="$train_gpus"
    fi
    (( num_machines * procs > 1 )) && [[ -z "$ACCELERATE_CONFIG" ]] && launch+=(--multi_gpu)
fi
launch+=(--num_processes "$((num_machines * procs))")
[[ -n "$ACCELERATE_CONFIG" ]] && launch=(--config_file "$ACCELERATE_CONFIG" "${launch[@]}")

if [[ "$REWARD_SERVER" == 1 ]]; then
    # This node's reward server (its own job step: slurm/common.sh), on this node's port in REWARD_PORTS (set by
    # the template for the job's nodes) or on REWARD_PORT when this script runs by hand.
    if [[ -n "${REWARD_PORTS:-}" ]]; then
        reward_port="$("$PYTHON" slurm/launch_helpers.py reward-port)"
    else
        reward_port="$REWARD_PORT"
    fi
    "$PYTHON" slurm/launch_helpers.py wait-health "http://127.0.0.1:$reward_port/health" --timeout "$HEALTH_TIMEOUT"
    reward_url="http://127.0.0.1:$reward_port"
    extra+=(--reward.url "$reward_url")
fi

echo "task $machine_rank/$num_machines on ${SLURMD_NODENAME:-$(hostname -s)}: $procs process(es), rendezvous $MASTER_ADDR:$MASTER_PORT," \
     "GPUs ${CUDA_VISIBLE_DEVICES:-none}, reward server ${reward_url:-none}" >&2
# The launcher ignores SIGUSR1 and SIGTERM (the dispositions survive exec) so that only the workers, which install
# their own handlers (train.preemption.StopSignal), react to them: they checkpoint and exit with status 3. A
# launcher killed by SIGTERM would end the step, and SLURM would then kill the workers mid-checkpoint.
trap '' USR1 TERM
# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
exec "$PYTHON" -m accelerate.commands.launch "${launch[@]}" $ACCELERATE_ARGS \
    slurm/run_stage.py "$module" "$@" "${extra[@]}"
