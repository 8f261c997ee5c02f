#!/bin/bash
# Pretrain the 7B hybrid on SLURM: one task per GPU inside the project's container (pyxis/enroot),
# a checkpoint and a requeue when the time limit nears, and a resume from `latest` on restart.
#
#   mkdir -p slurm/logs     # (already in a checkout) Slurm does not create the log directory
#   CONTAINER_IMAGE=/shared/images/hybrid-megatron.sqsh DATA_DIR=/shared/data \
#     sbatch --nodes=8 slurm/pretrain_7b.sh [key=value overrides ...]
#
# Every #SBATCH default below yields to an sbatch flag (`sbatch --time=12:00:00 ...`) or to
# sbatch's own SBATCH_* variables. Settings read from the environment (sbatch exports the
# submitting shell's environment by default):
#   CONFIG           run config (default configs/pretrain_7b.yaml, relative to the repository)
#   RUN_DIR          run directory: logs, launch records, checkpoints; must be on a filesystem every
#                    node sees (default <repo>/runs/<job name>-<job id>; set it to resume a run in
#                    a new job)
#   CONTAINER_IMAGE  squashfs file or registry image for pyxis (default <repo>/hybrid-megatron.sqsh)
#   DATA_DIR         data directory, mounted read-only at the same path (optional)
#   CKPT_DIR         checkpoint directory, mounted and passed as checkpoint.save_dir (optional;
#                    default <run dir>/checkpoints)
#   CONTAINER_MOUNTS extra pyxis mounts, SRC:DST[:FLAGS] comma separated (optional)
#   OVERRIDES        extra key=value overrides, space separated (arguments to this script too)
#   MAX_REQUEUES     requeue at most this many times (default 50); SLURM_RESTART_COUNT counts
#   REQUEUE_ON_TERM  1: also requeue after a SIGTERM save (clusters whose preemption cancels)
#   MASTER_PORT      rendezvous port (default derived from the job id)
#   CPUS_PER_TASK    CPU cores per task (default: the node's cores / tasks per node)
#   KILL_ON_BAD_EXIT 1 (default): end the whole step when one task fails instead of letting the
#                    others hang in a collective until the NCCL timeout
#   SRUN_ARGS        extra srun flags, space separated (e.g. "--no-container-mount-home")
#   NCCL_*, TORCH_*  passed through; cluster network settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA,
#                    ...) belong in the submitting environment, not in this script
#
# Exit codes: 0 finished; 75 saved after a signal (requeued unless capped); 2 bad setting; any
# other code is the training failure's own, and such a job is never requeued.
#
#SBATCH --job-name=hybrid-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
#
# --signal: USR1 reaches this shell (B:) 600 s before the limit (Slurm may send it up to 60 s
# early): time to finish the step in flight and write a torch_dist checkpoint of a 7B model with
# its fp32 optimizer state (~110 GB over all ranks) to a shared filesystem.
# --open-mode=append: a requeued job keeps the same log file instead of truncating it.

set -euo pipefail

# Slurm runs a copy of this file from its spool directory, so its own path need not lead to the
# repository: REPO_DIR if set, else this file's parent directory, else the submission directory.
REPO=${REPO_DIR:-}
if [[ -z $REPO ]]; then
  for REPO in "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f $REPO/slurm/common.sh ]] && break
  done
fi
if [[ ! -f $REPO/slurm/common.sh ]]; then
  echo "error: cannot find the repository (no slurm/common.sh under '$REPO'): run sbatch from the repository root or set REPO_DIR" >&2
  exit 2
fi
REPO=$(cd "$REPO" && pwd -P)
# shellcheck source=slurm/common.sh
. "$REPO/slurm/common.sh"

[[ -n ${SLURM_JOB_ID:-} ]] ||
  hm_die "$HM_EXIT_USAGE" "not inside a SLURM job (SLURM_JOB_ID is unset): submit with sbatch slurm/pretrain_7b.sh"

# ---------------------------------------------------------------- settings
CONFIG=$(hm_abspath "$REPO" "${CONFIG:-configs/pretrain_7b.yaml}")
RUN_DIR=$(hm_abspath "$REPO" "${RUN_DIR:-runs/${SLURM_JOB_NAME:-hybrid}-$SLURM_JOB_ID}")
CONTAINER_IMAGE=${CONTAINER_IMAGE:-$REPO/hybrid-megatron.sqsh}
MAX_REQUEUES=${MAX_REQUEUES:-50}
REQUEUE_ON_TERM=${REQUEUE_ON_TERM:-0}
KILL_ON_BAD_EXIT=${KILL_ON_BAD_EXIT:-1}
RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
hm_require_int MAX_REQUEUES "$MAX_REQUEUES"
hm_require_int SLURM_RESTART_COUNT "$RESTART_COUNT"
[[ $REQUEUE_ON_TERM == [01] ]] || hm_die "$HM_EXIT_USAGE" "REQUEUE_ON_TERM must be 0 or 1, got '$REQUEUE_ON_TERM'"
[[ $KILL_ON_BAD_EXIT == [01] ]] || hm_die "$HM_EXIT_USAGE" "KILL_ON_BAD_EXIT must be 0 or 1, got '$KILL_ON_BAD_EXIT'"

[[ -f $CONFIG ]] || hm_die "$HM_EXIT_USAGE" "CONFIG=$CONFIG: no such file (set CONFIG=path/to/run.yaml)"
# A path (absolute, ./relative or *.sqsh) must exist on the shared filesystem; anything else is a
# registry reference that pyxis pulls itself.
if [[ $CONTAINER_IMAGE == /* || $CONTAINER_IMAGE == ./* || $CONTAINER_IMAGE == *.sqsh ]]; then
  CONTAINER_IMAGE=$(hm_abspath "$REPO" "$CONTAINER_IMAGE")
  [[ -f $CONTAINER_IMAGE ]] ||
    hm_die "$HM_EXIT_USAGE" "CONTAINER_IMAGE=$CONTAINER_IMAGE: no such file (build it: docker/README.md)"
fi
if [[ -n ${DATA_DIR:-} ]]; then
  DATA_DIR=$(hm_abspath "$REPO" "$DATA_DIR")
  [[ -d $DATA_DIR ]] || hm_die "$HM_EXIT_USAGE" "DATA_DIR=$DATA_DIR: no such directory"
fi

# One task per GPU: the allocation must say so, or ranks would share GPUs or leave some idle.
num_nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
num_tasks=${SLURM_NTASKS:-}
[[ -n $num_tasks ]] || hm_die "$HM_EXIT_USAGE" "SLURM_NTASKS is unset: request one task per GPU with --ntasks-per-node"
hm_require_int SLURM_NTASKS "$num_tasks"
tasks_per_node=$((num_tasks / num_nodes))
gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
gpus_per_node=${gpus_per_node##*:}  # "h100:8" -> "8"
if [[ -n $gpus_per_node ]]; then
  hm_require_int "GPUs per node" "$gpus_per_node"
  ((tasks_per_node * num_nodes == num_tasks && tasks_per_node == gpus_per_node)) ||
    hm_die "$HM_EXIT_USAGE" "$num_tasks tasks on $num_nodes nodes with $gpus_per_node GPUs each: ask for one task per GPU (--ntasks-per-node=$gpus_per_node)"
fi
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05); without it every task would be
# pinned to one core and the data loader would starve.
CPUS_PER_TASK=${CPUS_PER_TASK:-$((${SLURM_CPUS_ON_NODE:-$tasks_per_node} / tasks_per_node))}
hm_require_int CPUS_PER_TASK "$CPUS_PER_TASK"
((CPUS_PER_TASK >= 1)) || CPUS_PER_TASK=1

# ---------------------------------------------------------------- rendezvous and environment
MASTER_ADDR=$(hm_master_addr) || exit
MASTER_PORT=${MASTER_PORT:-$(hm_master_port "$SLURM_JOB_ID")}
hm_require_int MASTER_PORT "$MASTER_PORT"
export MASTER_ADDR MASTER_PORT
# The entry point prefers torchrun's variables over SLURM's: ones leaked from the submitting shell
# would give every task the same rank.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK NODE_RANK TORCHELASTIC_RUN_ID

# NCCL and torch defaults; any value already in the environment wins.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # errors and warnings reach the log, not the per-call chatter
# Megatron's tensor/sequence-parallel overlap relies on one hardware queue ordering its kernels.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# On a collective timeout, dump each rank's NCCL flight recorder into the run directory: the
# first thing to read when a job hangs.
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
launch_dir=$RUN_DIR/launches/$SLURM_JOB_ID-$RESTART_COUNT
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$launch_dir/nccl_trace_rank_}
# torchrun's default: one intra-op thread per process instead of every core for each of 8 tasks.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# ---------------------------------------------------------------- command
overrides=("logging.run_dir=$RUN_DIR")
hm_add_mount "$REPO"
hm_add_mount "$RUN_DIR"
if [[ -n ${CKPT_DIR:-} ]]; then
  CKPT_DIR=$(hm_abspath "$REPO" "$CKPT_DIR")
  hm_add_mount "$CKPT_DIR"
  overrides+=("checkpoint.save_dir=$CKPT_DIR")
fi
[[ -z ${DATA_DIR:-} ]] || hm_add_mount "$DATA_DIR" ro
hm_add_mount "$(dirname "$CONFIG")" ro
mounts=$(hm_join_mounts)
mounts=$mounts${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}
read -r -a extra_overrides <<<"${OVERRIDES:-}"
read -r -a srun_args <<<"${SRUN_ARGS:-}"
for override in ${extra_overrides[@]+"${extra_overrides[@]}"} "$@"; do
  case $override in
    logging.run_dir=* | checkpoint.save_dir=*)
      hm_die "$HM_EXIT_USAGE" "override '$override': set RUN_DIR or CKPT_DIR instead (the script mounts them)" ;;
  esac
done
# No step number and no checkpoint path: `pretrain` resumes from <run dir>/checkpoints/latest, so
# the first run and every requeue run exactly this command.
train_cmd=(hybrid-megatron pretrain "$CONFIG" "${overrides[@]}" ${extra_overrides[@]+"${extra_overrides[@]}"} "$@")
srun_cmd=(
  srun
  --kill-on-bad-exit="$KILL_ON_BAD_EXIT"
  --cpus-per-task="$CPUS_PER_TASK"
  --container-image="$CONTAINER_IMAGE"
  --container-mounts="$mounts"
  --container-workdir="$REPO"
  ${srun_args[@]+"${srun_args[@]}"}
  "${train_cmd[@]}"
)

# pyxis refuses to mount a source that does not exist
mkdir -p "$RUN_DIR" "$launch_dir" ${CKPT_DIR:+"$CKPT_DIR"}
hm_write_launch_record "$launch_dir" "$REPO" "${srun_cmd[@]}"
cat >"$launch_dir/settings.txt" <<EOF
job_id=$SLURM_JOB_ID
restart_count=$RESTART_COUNT
max_requeues=$MAX_REQUEUES
requeue_on_term=$REQUEUE_ON_TERM
nodes=$num_nodes
tasks_per_node=$tasks_per_node
cpus_per_task=$CPUS_PER_TASK
config=$CONFIG
run_dir=$RUN_DIR
container_image=$CONTAINER_IMAGE
container_mounts=$mounts
master=$MASTER_ADDR:$MASTER_PORT
EOF
hm_log "job $SLURM_JOB_ID restart $RESTART_COUNT: $num_nodes node(s) x $tasks_per_node task(s)," \
  "rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
hm_log "launch record: $launch_dir"

hm_run_step "${srun_cmd[@]}"
rc=0
hm_finish "$HM_STEP_RC" "$RESTART_COUNT" "$MAX_REQUEUES" "$REQUEUE_ON_TERM" || rc=$?
exit "$rc"
