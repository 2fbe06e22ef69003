#!/usr/bin/env bash
#SBATCH --job-name=imagenet                # names the log file and shows in squeue
#SBATCH --nodes=1                          # nodes (sbatch --nodes=N overrides)
#SBATCH --ntasks-per-node=4                # one task (process) per GPU
#SBATCH --gpus-per-node=4                  # 4 GPUs on each node
#SBATCH --cpus-per-task=16                 # 16 cores per GPU: JPEG decoding is the bottleneck
#SBATCH --mem=240G                         # memory per node: DataLoader workers and page cache
#SBATCH --time=24:00:00                    # wall-clock limit, hh:mm:ss
#SBATCH --output=%x-%j.out                 # log: job name and job id, in the directory you submit from
#SBATCH --signal=USR1@120                  # SIGUSR1 2 min before the time limit: checkpoint, then requeue
#SBATCH --requeue                          # allow the job to put itself back in the queue (scontrol requeue)
#SBATCH --open-mode=append                 # a requeued run appends to the same log
#
# ImageNet on N nodes x 4 GPUs: a staging step per node, then one srun task per GPU.
#   usage: sbatch run-imagenet.sh SCRIPT.py [ARGS...]
#   e.g.   sbatch run-imagenet.sh imagenet_ddp.py --data-dir=/datasets/imagenet --checkpoint-dir=ckpt
#   sweep: SWEEP=lines.txt sbatch --array=0-N --output=%x-%A_%a.out run-imagenet.sh SCRIPT.py [ARGS...]
# No account or partition is set here: add them when you submit (sbatch --account=ACC --partition=PART ...) or
# export SBATCH_ACCOUNT / SBATCH_PARTITION once. PYTHON may be a command with arguments, e.g. a container:
#   PYTHON="apptainer exec --nv image.sif python" sbatch run-imagenet.sh ...
set -euo pipefail
wrapper=run-imagenet.sh  # sbatch runs a copy of this file under another name
usage="usage: sbatch $wrapper SCRIPT.py [ARGS...]"
if [ $# -eq 0 ]; then echo "ERROR: no training script given. $usage" >&2; exit 2; fi
script=$1
shift
if [ ! -f "$script" ]; then echo "ERROR: training script '$script' not found in $PWD. $usage" >&2; exit 2; fi
: "${SLURM_JOB_ID:?submit this file with sbatch. $usage}"

# A sweep, N runs that differ in a few arguments: a job array whose task K appends line K of the file $SWEEP
# (counted from 0; blank and # lines skipped) to the arguments above, e.g. with a 3-line lrs.txt
#   SWEEP=lrs.txt sbatch --array=0-2 --output=%x-%A_%a.out run-gpu4.sh mnist_ddp.py --epochs=10
# Each task names its metrics, TensorBoard run and checkpoint folder ARRAYJOB_TASK (the log: %A_%a); a requeued task
# resumes its own checkpoints. The file is read when each task starts: leave it as it is until the array ends.
if [ -n "${SWEEP:-}" ]; then
  if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "ERROR: SWEEP=$SWEEP is set, but this job is not an array. HINT: sbatch --array=0-N $wrapper ..." >&2; exit 2
  fi
  if [ ! -f "$SWEEP" ]; then echo "ERROR: sweep file '$SWEEP' (\$SWEEP) not found in $PWD" >&2; exit 2; fi
  mapfile -t sweep < <(grep -Ev '^[[:space:]]*(#|$)' "$SWEEP")
  if [ ${#sweep[@]} -eq 0 ]; then echo "ERROR: sweep file '$SWEEP' has no lines of arguments" >&2; exit 2; fi
  if [ "$SLURM_ARRAY_TASK_ID" -ge "${#sweep[@]}" ]; then
    echo "ERROR: this is array task $SLURM_ARRAY_TASK_ID, but $SWEEP has ${#sweep[@]} lines (tasks 0 to" \
      "$((${#sweep[@]} - 1))). HINT: sbatch --array=0-$((${#sweep[@]} - 1)) ..." >&2; exit 2
  fi
  if ! words=$(xargs printf '%s\n' <<< "${sweep[$SLURM_ARRAY_TASK_ID]}" 2>&1); then  # words, quotes as in a shell
    echo "ERROR: line $SLURM_ARRAY_TASK_ID of $SWEEP: $words" >&2; exit 2
  fi
  mapfile -t line <<< "$words"
  set -- "$@" "${line[@]}"
  echo "== sweep $SWEEP, task $SLURM_ARRAY_TASK_ID of ${#sweep[@]} (array job $SLURM_ARRAY_JOB_ID): ${line[*]} =="
fi

# Site set-up (module loads, venv or conda activation): sourced if the file is there; every task inherits it
site=${SITE_SETUP:-slurm/site.sh}
# shellcheck source=/dev/null
if [ -f "$site" ]; then echo "== site set-up: $site =="; source "$site"; fi

# Every rank must agree where rank 0 listens: the job's first node, on a port derived from the job id
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1  # log lines appear as they are printed, not at exit
read -ra python <<< "${PYTHON:-python}"  # a command with arguments is split into words
nodes=$SLURM_JOB_NUM_NODES
gpus=${SLURM_GPUS_ON_NODE:-1}  # GPUs allocated on each node
cpus=${SLURM_CPUS_PER_TASK:-1}
echo "== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $nodes node(s) x $gpus GPU(s) =="
echo "== rank 0 at $MASTER_ADDR:$MASTER_PORT; ${python[*]} $script $* =="

# Staging: one task per node, with all the cores the node's training tasks will have, copies the data to local
# disk (skipped where a complete copy is already there) before any training process starts.
tasks_per_node=${SLURM_NTASKS_PER_NODE:-$gpus}
echo "== staging: $script --stage-only, once on each of the $nodes node(s) =="
srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task=$(( cpus * ${tasks_per_node%%[!0-9]*} )) \
  --kill-on-bad-exit=1 "${python[@]}" "$script" --stage-only "$@"

# Launch: srun starts one task per GPU on every node; each reads its rank from SLURM_PROCID and SLURM_LOCALID.
# srun does not pass sbatch's --cpus-per-task on (Slurm >= 22.05): say it again. --kill-on-bad-exit: one task
# failing ends the others at once, instead of leaving them waiting in a collective until the time limit.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}
srun --cpus-per-task="$cpus" --kill-on-bad-exit=1 "${python[@]}" "$script" "$@"
