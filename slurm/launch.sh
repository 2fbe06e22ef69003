#!/usr/bin/env bash
# The shared body of the sbatch wrappers (run-gpu*.sh); they run it as
#   launch.sh torchrun|srun SCRIPT.py [ARGS...]
# torchrun: one torchrun per node (srun --ntasks-per-node=1), each starting one process per GPU; they meet at a
#           c10d rendezvous on the first node of the job, on a port derived from the job id.
# srun:     one task per GPU, started by srun itself; the scripts read SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
# Nodes and GPUs per node come from the allocation, so `sbatch --nodes=3 run-gpu8-dist.sh ...` works as well.
set -euo pipefail

mode=${1:?launch.sh needs a mode: torchrun or srun}
shift
wrapper=${WRAPPER_NAME:-run-gpuN.sh}
usage="usage: sbatch $wrapper SCRIPT.py [ARGS...]   (e.g. sbatch $wrapper mnist_ddp.py --epochs=100)"
if [ $# -eq 0 ]; then
  echo "ERROR: no training script given. $usage" >&2
  exit 2
fi
script=$1
shift
if [ ! -f "$script" ]; then
  echo "ERROR: training script '$script' not found in $PWD (the directory sbatch was called from). $usage" >&2
  exit 2
fi
: "${SLURM_JOB_ID:?this runs inside a Slurm job: $usage}"

# Site set-up, the one place for your cluster's module loads and venv activation (see slurm/site.sh).
site=${SITE_SETUP:-$(dirname "${BASH_SOURCE[0]}")/site.sh}
if [ -f "$site" ]; then
  # shellcheck disable=SC1090
  source "$site"
fi

nodes=$SLURM_JOB_NUM_NODES
# GPUs on each node: Slurm's count of the allocated gres; else what CUDA_VISIBLE_DEVICES lists; else 1
if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
  gpus=$SLURM_GPUS_ON_NODE
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
else
  gpus=1
fi
cpus=${SLURM_CPUS_PER_TASK:-1}
# every rank must agree on where rank 0 listens: the first node of the job, a port derived from the job id
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1  # log lines appear as they are printed, not at exit
PYTHON=${PYTHON:-python}

echo "== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $nodes node(s) x $gpus GPU(s), $mode, rank 0 at $MASTER_ADDR:$MASTER_PORT =="
echo "== $PYTHON $script $* =="
if [ "${STAGE_FIRST:-0}" = 1 ]; then
  # one task per node with all of the node's cores, before any training process starts (run-imagenet.sh)
  tasks_per_node=${SLURM_NTASKS_PER_NODE:-$gpus}
  echo "== staging: $script --stage-only, once on each of the $nodes node(s) =="
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task=$(( cpus * ${tasks_per_node%%[!0-9]*} )) \
    --kill-on-bad-exit=1 "$PYTHON" "$script" --stage-only "$@"
fi
# srun does not pass sbatch's --cpus-per-task on (Slurm >= 22.05): say it again. --kill-on-bad-exit: one
# task failing ends the others at once, instead of leaving them waiting in a collective until the time limit.
# torchrun runs through slurm/torchrun.py, which passes the time-limit warning (SIGUSR1) on to the workers.
case $mode in
  torchrun)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / gpus > 0 ? cpus / gpus : 1 ))}
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
      "$PYTHON" "$(dirname "${BASH_SOURCE[0]}")/torchrun.py" --nnodes="$nodes" --nproc_per_node="$gpus" \
      --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
      "$script" "$@"
    ;;
  srun)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}
    srun --cpus-per-task="$cpus" --kill-on-bad-exit=1 "$PYTHON" "$script" "$@"
    ;;
  *)
    echo "ERROR: unknown mode '$mode' (torchrun or srun)" >&2
    exit 2
    ;;
esac
