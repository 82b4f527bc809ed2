# Shared body of slurm/sft.sbatch, slurm/ppo.sbatch and slurm/eval.sbatch (sourced, not run): settings, the
# reward server step, the training step, preemption and requeue. The knobs are documented in each template.

detox_help() {  # print the template's header: everything from line 2 up to the first line that is not a comment
    awk 'NR == 1 { next } /^#SBATCH/ { print; next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

detox_log() { echo "[$(date '+%F %T')] detox-slurm: $*" >&2; }

# Wait for a background process even when a trapped signal interrupts `wait`; sets $WAIT_STATUS.
detox_wait() {
    local pid="$1" status again
    while :; do
        status=0; wait "$pid" || status=$?
        if ! kill -0 "$pid" 2>/dev/null; then
            again=0; wait "$pid" 2>/dev/null || again=$?   # the real status if the first wait was interrupted
            if [[ "$again" != 127 ]]; then status="$again"; fi
            break
        fi
    done
    WAIT_STATUS="$status"
}

# The batch shell gets SIGUSR1 before the time limit (--signal=B:USR1@...) and SIGTERM on preemption; it passes
# SIGUSR1 on to the training step, whose workers checkpoint and exit with status 3.
detox_on_signal() {
    detox_log "received SIG$1: asking the training step to checkpoint and stop"
    if [[ -n "${TRAIN_PID:-}" ]]; then
        kill -USR1 "$TRAIN_PID" 2>/dev/null || true
        # A worker still loading its model has no handler yet (it ignores SIGUSR1 until then): say it again
        # every 20 s until the step ends.
        if [[ "$STOP_REQUESTED" == 0 ]]; then
            ( while sleep 20 && kill -0 "$TRAIN_PID" 2>/dev/null; do kill -USR1 "$TRAIN_PID" 2>/dev/null; done ) &
        fi
    fi
    STOP_REQUESTED=1
    STOP_SIGNAL="$1"
}

detox_stop_reward_server() {
    if [[ -n "${SERVER_PID:-}" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        detox_log "stopping the reward server step"
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        detox_wait "$SERVER_PID"
    fi
    SERVER_PID=""
}

# Requeue the job (its next run passes --resume) or, with REQUEUE=0 or outside SLURM, stop with status 3.
detox_requeue_or_stop() {  # detox_requeue_or_stop STAGE WHAT_HAPPENED
    if [[ "$REQUEUE" == 1 && -n "${SLURM_JOB_ID:-}" ]]; then
        detox_log "$1 $2: requeueing job $SLURM_JOB_ID (it resumes with --resume)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            sleep 120 || true   # the requeue ends this job (SIGTERM) before it could finish as FAILED
            return 0
        fi
    fi
    detox_log "$1 $2 (REQUEUE=$REQUEUE): resubmit with RESUME=1 to continue"
    return 3
}

# detox_main STAGE MODULE TEMPLATE_PATH [stage args...]
detox_main() {
    local stage="$1" module="$2" template="$3"; shift 3
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" || $# == 0 ]]; then
        detox_help "$template"
        [[ $# == 0 ]] && { echo "error: no arguments: pass at least --config FILE (see above)" >&2; return 2; }
        return 0
    fi
    set -euo pipefail

    # ---- settings (environment knobs, with defaults) -------------------------------------------------------
    export REPO="${DETOX_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
    cd "$REPO"
    [[ -f slurm/launch_helpers.py ]] || { echo "error: $REPO is not the detox-sum repository: submit from its root or set DETOX_REPO" >&2; return 2; }
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x .venv/bin/python ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
    fi
    export PYTHON
    export DETOX_CPU="${DETOX_CPU:-0}"
    local default_server=0 default_reserve=0
    if [[ "$stage" == ppo ]]; then default_server=1; default_reserve=1; fi
    export REWARD_SERVER="${REWARD_SERVER:-$default_server}"
    export RESERVE_REWARD_GPU="${RESERVE_REWARD_GPU:-$default_reserve}"
    if [[ "$stage" == sft ]]; then REWARD_SERVER=0; RESERVE_REWARD_GPU=0; fi   # SFT has no reward model
    [[ "$DETOX_CPU" == 1 ]] && RESERVE_REWARD_GPU=0
    export HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"
    export REQUEUE="${REQUEUE:-1}"
    local job="${SLURM_JOB_ID:-0}"
    export MASTER_PORT="${MASTER_PORT:-$((29500 + job % 10000))}"
    export REWARD_PORT="${REWARD_PORT:-$((19500 + job % 10000))}"
    export ACCELERATE_ARGS="${ACCELERATE_ARGS:-}"
    # First node of the allocation: the rendezvous host of a multi-node run.
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    else
        MASTER_ADDR=127.0.0.1
    fi
    export MASTER_ADDR
    local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
    local machines="${SLURM_NTASKS:-$nodes}"
    if [[ "$DETOX_CPU" == 1 ]]; then
        export PROCS_PER_MACHINE="${PROCS_PER_MACHINE:-1}"
        export ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-}"
    else
        local gpus
        gpus="$("$PYTHON" slurm/launch_helpers.py gpus --role train --reserve-reward "$RESERVE_REWARD_GPU")" || return 2
        export PROCS_PER_MACHINE="$(awk -F, '{print NF}' <<<"$gpus")"
        if [[ -z "${ACCELERATE_CONFIG:-}" ]]; then
            if (( machines > 1 )); then ACCELERATE_CONFIG=accelerate_configs/multi_node_zero3.yaml
            elif (( PROCS_PER_MACHINE > 1 )); then ACCELERATE_CONFIG=accelerate_configs/multi_gpu.yaml
            else ACCELERATE_CONFIG=accelerate_configs/single_gpu.yaml; fi
        fi
        export ACCELERATE_CONFIG
    fi

    # ---- the config, read by the code that trains with it (never grepped) -----------------------------------
    local reward_device=cpu
    [[ "$DETOX_CPU" != 1 ]] && reward_device=cuda:0   # the server sees only its reserved GPU
    local plan
    plan="$("$PYTHON" slurm/launch_helpers.py plan --stage "$stage" --machines "$machines" \
             --procs-per-machine "$PROCS_PER_MACHINE" --reward-device "$reward_device" -- "$@")" || return 2
    eval "$plan"   # OUTPUT_DIR NUM_PROCESSES REWARD_SERVER_ARGS REWARD_URL_SET

    local args=("$@")
    local restarts="${SLURM_RESTART_COUNT:-0}"
    if [[ "$stage" != eval ]] && { (( restarts > 0 )) || [[ "${RESUME:-0}" == 1 ]]; }; then
        [[ " ${args[*]} " == *" --resume "* ]] || args+=(--resume)
    fi
    export DETOX_PREEMPTED_MARKER="$OUTPUT_DIR/.slurm/${SLURM_JOB_ID:-local}.preempted"
    rm -f "$DETOX_PREEMPTED_MARKER"
    detox_log "$stage: job ${SLURM_JOB_ID:-?} restart $restarts, $machines machine(s) x $PROCS_PER_MACHINE process(es)" \
              "(cpu=$DETOX_CPU, accelerate config ${ACCELERATE_CONFIG:-flags}), output $OUTPUT_DIR, args: ${args[*]}"

    STOP_REQUESTED=0
    STOP_SIGNAL=""
    trap 'detox_on_signal USR1' USR1
    trap 'detox_on_signal TERM' TERM

    # ---- reward server: its own job step, one per node, health-checked before training ---------------------
    SERVER_PID=""
    if [[ "$REWARD_SERVER" == 1 ]]; then
        # Next to the job's own log (sbatch --output), one file per node.
        local job_log log_dir="$REPO"
        job_log="$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n1)"
        [[ -n "$job_log" ]] && log_dir="$(dirname "$job_log")"
        # %N-%n: host name and node index (two nodes can share a host, as on the CI cluster).
        local server_log="$log_dir/${SLURM_JOB_NAME:-detox}-${SLURM_JOB_ID:-0}.reward-%N-%n.out"
        # Each node's port: REWARD_PORT, or REWARD_PORT + i for the i-th of several nodes sharing one host.
        local ports
        ports="$("$PYTHON" slurm/launch_helpers.py reward-ports --base "$REWARD_PORT" --master-port "$MASTER_PORT")" \
            || return 2
        eval "export $ports"   # REWARD_PORTS=node:port,...; slurm/task.sh reads it too
        # shellcheck disable=SC2016  # expanded by the step's own shell, on each node
        local port_cmd='set -e; port="$("$PYTHON" slurm/launch_helpers.py reward-port)"; '
        local step_cmd="$port_cmd"
        local threads=""
        if [[ "$DETOX_CPU" == 1 ]]; then
            threads="--reward_server.torch_threads ${SLURM_CPUS_PER_TASK:-1}"
        else
            # shellcheck disable=SC2016
            step_cmd+='gpus="$("$PYTHON" slurm/launch_helpers.py gpus --role reward --reserve-reward 1)"; '
            step_cmd+='export CUDA_VISIBLE_DEVICES="$gpus"; '
        fi
        # The server ignores SIGUSR1 (meant for the trainers) and keeps scoring until the training step is done.
        # REWARD_SERVER_ARGS: the config's reward and reward_server settings; later overrides win.
        step_cmd+='trap "" USR1; exec "$PYTHON" -m rewards.server '
        step_cmd+="$REWARD_SERVER_ARGS $threads"' --reward_server.host 127.0.0.1 --reward_server.port "$port"'
        detox_log "starting the reward server step, ports $REWARD_PORTS (log: $server_log)"
        # --kill-on-bad-exit: a server that fails on any node ends the step, which the wait below sees at once.
        srun --overlap --export=ALL --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
             --output="$server_log" bash -c "$step_cmd" &
        SERVER_PID=$!
        # Every node's server answers before training starts (they listen on 127.0.0.1: check from each node).
        # shellcheck disable=SC2016
        local check="$port_cmd"'exec "$PYTHON" slurm/launch_helpers.py wait-health --timeout "$HEALTH_TIMEOUT" '
        check+='"http://127.0.0.1:$port/health"'
        srun --overlap --export=ALL --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
             bash -c "$check" &
        local health_pid=$!
        while [[ "$STOP_REQUESTED" == 0 ]] && kill -0 "$health_pid" 2>/dev/null && kill -0 "$SERVER_PID" 2>/dev/null; do
            sleep 1
        done
        local health_status=0 server_alive=1
        if [[ "$STOP_REQUESTED" == 0 ]] && ! kill -0 "$health_pid" 2>/dev/null; then
            detox_wait "$health_pid"
            health_status="$WAIT_STATUS"
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || server_alive=0
        if [[ "$STOP_REQUESTED" == 0 && ( "$health_status" != 0 || "$server_alive" == 0 ) ]]; then
            sleep 1   # a preempted job's steps get SIGTERM too: let this shell's own trap run before calling it a failure
        fi
        if kill -0 "$health_pid" 2>/dev/null; then
            kill -TERM "$health_pid" 2>/dev/null || true
            detox_wait "$health_pid"
        fi
        if [[ "$STOP_REQUESTED" == 0 && "$server_alive" == 0 ]]; then
            detox_wait "$SERVER_PID"
            detox_log "error: the reward server step ended (status $WAIT_STATUS) before every node's server answered" \
                      "or training started: see $server_log"
            SERVER_PID=""
            return 1
        fi
        if [[ "$STOP_REQUESTED" == 0 && "$health_status" != 0 ]]; then
            detox_log "error: not every node's reward server answered /health within" \
                      "HEALTH_TIMEOUT=${HEALTH_TIMEOUT}s: see $server_log"
            detox_stop_reward_server
            return 1
        fi
    fi

    # ---- asked to stop before training started: nothing to checkpoint ----------------------------------------
    local rc=0
    if [[ "$STOP_REQUESTED" == 1 ]]; then
        detox_stop_reward_server
        if [[ "$STOP_SIGNAL" == TERM ]]; then   # preempted: run again later
            detox_requeue_or_stop "$stage" "was preempted before it started" || rc=$?
            return "$rc"
        fi
        # The time-limit warning (or a SIGUSR1 by hand): a requeued run would only stop the same way again.
        detox_log "$stage got SIG$STOP_SIGNAL before training started (nothing to checkpoint; not requeued): give the" \
                  "job more --time than its reward servers need to start"
        return 3
    fi

    # ---- training / evaluation step: one task per machine --------------------------------------------------
    srun --overlap --export=ALL --kill-on-bad-exit=1 bash slurm/task.sh "$module" "${args[@]}" &
    TRAIN_PID=$!
    # A signal that came between the check above and TRAIN_PID: pass it on now.
    if [[ "$STOP_REQUESTED" == 1 ]]; then STOP_REQUESTED=0; detox_on_signal "$STOP_SIGNAL"; fi
    detox_wait "$TRAIN_PID"
    local status="$WAIT_STATUS"
    TRAIN_PID=""
    detox_stop_reward_server

    # ---- preempted (checkpoint written, status 3): requeue; the next run passes --resume ------------------
    if [[ -e "$DETOX_PREEMPTED_MARKER" ]]; then
        rm -f "$DETOX_PREEMPTED_MARKER"
        detox_requeue_or_stop "$stage" "stopped after a checkpoint" || rc=$?
        return "$rc"
    fi
    if [[ "$status" != 0 ]]; then
        detox_log "$stage failed with status $status (stop requested: $STOP_REQUESTED)"
    else
        detox_log "$stage finished"
    fi
    return "$status"
}
