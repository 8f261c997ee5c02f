# shellcheck shell=bash
# Helpers shared by the sbatch scripts in slurm/. Sourced, never run.
#
# The contract with the training entry point (`hybrid-megatron pretrain CONFIG [key=value ...]`):
#   - every task reads its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and rendezvous at
#     MASTER_ADDR:MASTER_PORT, which the batch script exports;
#   - on SIGUSR1 or SIGTERM all ranks agree, save a checkpoint and exit with code 75;
#   - exit 0 means the configured steps are done; any other code is a failure;
#   - a restart resumes from <run_dir>/checkpoints/latest by itself, so a requeued job re-runs the
#     very same command.

# Exit code of a task that saved a checkpoint after a signal and asks to be requeued.
readonly HM_EXIT_REQUEUE=75
# Exit code for a bad setting (the CLI uses 2 for config errors too).
readonly HM_EXIT_USAGE=2

hm_log() {
  printf '[%s] %s\n' "$(date '+%F %T')" "$*" >&2
}

# die CODE MESSAGE: one line on stderr, then exit CODE.
hm_die() {
  local code=$1
  shift
  printf 'error: %s\n' "$*" >&2
  exit "$code"
}

hm_require_int() {  # NAME VALUE
  [[ $2 =~ ^[0-9]+$ ]] || hm_die "$HM_EXIT_USAGE" "$1 must be a non-negative integer, got '$2'"
}

# Absolute path of $2 relative to directory $1 (the path need not exist).
hm_abspath() {  # BASE PATH
  case $2 in
    /*) printf '%s\n' "$2" ;;
    *) printf '%s\n' "$1/${2#./}" ;;
  esac
}

# First host of the allocation: the rendezvous host for torch.distributed.
hm_master_addr() {
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") ||
    hm_die 1 "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
  [[ -n $hosts ]] || hm_die 1 "SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' expands to no host"
  printf '%s\n' "${hosts%%$'\n'*}"
}

# A port derived from the job id, so that jobs sharing a node do not collide. It stays in
# 10000-29999, below Linux's ephemeral range (32768-60999) where outgoing connections get ports.
hm_master_port() {  # JOB_ID
  printf '%d\n' $((10000 + $1 % 20000))
}

# Same-path bind mounts for pyxis (SRC:DST[:FLAGS], comma separated). Paths stay identical inside
# and outside the container, so configs, logs and error messages need no translation. A path
# under one already mounted is skipped.
HM_MOUNTS=()
hm_add_mount() {  # PATH [FLAGS]
  local path=$1 flags=${2:-} mount
  [[ $path != *[,:]* ]] ||
    hm_die "$HM_EXIT_USAGE" "cannot bind-mount '$path': pyxis mount paths may not contain ',' or ':'"
  for mount in "${HM_MOUNTS[@]}"; do
    mount=${mount%%:*}
    [[ $path == "$mount" || $path == "$mount"/* ]] && return 0
  done
  HM_MOUNTS+=("$path:$path${flags:+:$flags}")
}

hm_join_mounts() {
  local IFS=,
  printf '%s\n' "${HM_MOUNTS[*]}"
}

# Environment summary for the run directory: the variables that decide how the job ran. Nothing
# that looks like a credential is written.
hm_env_summary() {
  env | LC_ALL=C sort |
    grep -E '^(SLURM_|SLURMD_|NCCL_|TORCH_|CUDA_|MASTER_|OMP_|PYXIS_|ENROOT_|HOSTNAME=)' |
    grep -Ev '(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)[A-Z_]*=' || true
}

# Git revision of the checkout the job was submitted from ("unknown" outside a git checkout).
hm_git_revision() {  # REPO
  local rev
  if rev=$(git -C "$1" rev-parse HEAD 2>/dev/null); then
    if [[ -n $(git -C "$1" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      rev="$rev (dirty: see git.diff)"
    fi
    printf '%s\n' "$rev"
  else
    printf 'unknown (not a git checkout)\n'
  fi
}

# Write what this launch ran into DIR: command.txt (shell-quoted, one line), env.txt (exported
# variables), git.txt and, for a dirty checkout, git.diff.
hm_write_launch_record() {  # DIR REPO COMMAND...
  local dir=$1 repo=$2
  shift 2
  mkdir -p "$dir"
  printf '%q ' "$@" | sed 's/ $//' >"$dir/command.txt"
  printf '\n' >>"$dir/command.txt"
  hm_env_summary >"$dir/env.txt"
  hm_git_revision "$repo" >"$dir/git.txt"
  if [[ $(cat "$dir/git.txt") == *dirty* ]]; then
    git -C "$repo" diff HEAD >"$dir/git.diff" 2>/dev/null || true
  fi
}

# Run a job step in the background and wait for it while forwarding USR1/TERM to it: srun passes
# the signals it receives on to every task. Bash runs a trap only between commands, so the step
# must not run in the foreground or the signal would wait until training ended on its own.
# Sets HM_STEP_RC (the step's exit code) and HM_SIGNAL (the last signal received, or empty).
HM_STEP_PID=
HM_SIGNAL=
HM_STEP_RC=
hm_forward_signal() {  # SIGNAL
  HM_SIGNAL=$1
  if [[ -n $HM_STEP_PID ]] && kill -0 "$HM_STEP_PID" 2>/dev/null; then
    hm_log "received SIG$1: forwarding it to the training tasks (they save a checkpoint and exit)"
    kill -s "$1" "$HM_STEP_PID" 2>/dev/null || true
  else
    hm_log "received SIG$1 with no training step running"
  fi
}

# shellcheck disable=SC2034  # HM_STEP_RC is read by the sourcing script
hm_run_step() {  # COMMAND...
  trap 'hm_forward_signal USR1' USR1
  trap 'hm_forward_signal TERM' TERM
  "$@" &
  HM_STEP_PID=$!
  # A signal that arrived while the step was being started is forwarded now.
  [[ -z $HM_SIGNAL ]] || hm_forward_signal "$HM_SIGNAL"
  while :; do
    HM_STEP_RC=0
    wait "$HM_STEP_PID" || HM_STEP_RC=$?
    # wait returns early (status > 128) when a trapped signal arrives; keep waiting while the
    # step is alive. Once it is gone, bash still holds its exit status for one more wait.
    if ! kill -0 "$HM_STEP_PID" 2>/dev/null; then
      HM_STEP_RC=0
      wait "$HM_STEP_PID" || HM_STEP_RC=$?
      break
    fi
  done
  HM_STEP_PID=
}

# Decide what the job does after the step: returns the exit code for the batch script.
#   0             finished: exit 0
#   75            saved after a signal: requeue (unless capped, or SIGTERM said Slurm decides)
#   anything else a failure: never requeued, exit with the step's code
hm_finish() {  # STEP_RC RESTART_COUNT MAX_REQUEUES REQUEUE_ON_TERM
  local rc=$1 restarts=$2 max=$3 on_term=$4
  if ((rc == 0)); then
    hm_log "training finished"
    return 0
  fi
  if ((rc != HM_EXIT_REQUEUE)); then
    hm_log "training failed with exit code $rc: not requeuing (see the log above)"
    return "$rc"
  fi
  if [[ $HM_SIGNAL == TERM && $on_term != 1 ]]; then
    # SIGTERM comes from scancel, preemption or the time limit itself: Slurm decides what happens
    # next (a preempted job with --requeue is requeued by Slurm), and requeuing here would undo a
    # user's scancel.
    hm_log "checkpoint saved after SIGTERM: leaving the job to Slurm (REQUEUE_ON_TERM=1 requeues it)"
    return "$rc"
  fi
  if ((restarts >= max)); then
    hm_log "checkpoint saved, but this job was already requeued $restarts times (MAX_REQUEUES=$max):" \
      "not requeuing; resubmit with RUN_DIR set to this run to continue"
    return "$rc"
  fi
  hm_log "checkpoint saved: requeuing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    hm_log "scontrol requeue $SLURM_JOB_ID failed: resubmit with RUN_DIR set to this run to continue"
  fi
  return "$rc"
}
