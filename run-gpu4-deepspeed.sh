#!/usr/bin/env bash
#SBATCH --job-name=deepspeed-gpu4          # names the log file and shows in squeue
#SBATCH --nodes=1                          # nodes (sbatch --nodes=N overrides)
#SBATCH --ntasks-per-node=1                # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=4                  # 4 GPUs on each node
#SBATCH --cpus-per-task=32                 # 8 cores per GPU, for the 4 processes of this task
#SBATCH --mem=128G                         # memory per node
#SBATCH --time=02:00:00                    # wall-clock limit, hh:mm:ss
#SBATCH --output=%x-%j.out                 # log: job name and job id, in the directory you submit from
#SBATCH --signal=USR1@120                  # SIGUSR1 2 min before the time limit: checkpoint, then requeue
#SBATCH --requeue                          # allow the job to put itself back in the queue (scontrol requeue)
#SBATCH --open-mode=append                 # a requeued run appends to the same log
#
# 1 node x 4 GPUs, DeepSpeed's launcher starting one process per GPU.
#   e.g.   sbatch run-gpu4-deepspeed.sh mnist_ddp_deepspeed.py --deepspeed --deepspeed_config ds_config.json
# No account or partition here: add them when you submit (sbatch --account=ACC --partition=PART ...). Containers
# (docs/containers.md): PYTHON="apptainer exec --nv image.sif python", or SRUN_ARGS="--container-image=..." (pyxis)
set -euo pipefail
wrapper=run-gpu4-deepspeed.sh  # sbatch runs a copy of this file under another name
usage="usage: sbatch $wrapper SCRIPT.py [ARGS...]"
[ $# -gt 0 ] || { echo "ERROR: no training script given. $usage" >&2; exit 2; }
script=$1 && shift
[ -f "$script" ] || { echo "ERROR: training script '$script' not found in $PWD. $usage" >&2; exit 2; }
: "${SLURM_JOB_ID:?submit this file with sbatch. $usage}"
site=${SITE_SETUP:-slurm/site.sh}  # module loads, venv or conda activation: sourced if there; every task inherits it
# shellcheck source=/dev/null
if [ -f "$site" ]; then echo "== site set-up: $site =="; source "$site"; fi
read -ra python <<< "${PYTHON:-python}" && read -ra srun_args <<< "${SRUN_ARGS:-}"  # commands with arguments: words
# Rank 0 listens on the job's first node (where this shell has no scontrol, as in a container: from the node list)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)
MASTER_ADDR=${MASTER_ADDR:-$("${python[@]}" -c "import cluster; print(cluster.first_host('$SLURM_JOB_NODELIST'))")}
MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000)) REQUEUE_REQUEST=$PWD/.requeue-$SLURM_JOB_ID && rm -f "$REQUEUE_REQUEST"
export MASTER_ADDR MASTER_PORT REQUEUE_REQUEST PYTHONUNBUFFERED=1  # log lines appear as they are printed
nodes=$SLURM_JOB_NUM_NODES gpus=${SLURM_GPUS_ON_NODE:-1} cpus=${SLURM_CPUS_PER_TASK:-1}
echo "== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $nodes node(s) x $gpus GPU(s) =="
echo "== rank 0 at $MASTER_ADDR:$MASTER_PORT; ${python[*]} $script $* =="

# Launch: one task runs DeepSpeed's launcher, a process per GPU in CUDA_VISIBLE_DEVICES (Slurm's; --num_gpus=N takes
# 0..N-1, maybe another job's). It ignores the stop signals Slurm sends the step, else it dies before the workers save.
if [ "$nodes" -gt 1 ]; then echo "ERROR: $wrapper runs on one node; for more, use run-gpu8.sh. $usage" >&2; exit 2; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / gpus > 0 ? cpus / gpus : 1 ))}
count=() && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || count=(--num_gpus="$gpus")
srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 "${srun_args[@]}" \
  bash -c 'trap "" USR1 USR2 TERM; exec "$@"' deepspeed "${python[@]}" -m deepspeed.launcher.runner \
  "${count[@]}" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$script" "$@" && rc=0 || rc=$?
# The step asked for a requeue it could not make itself (REQUEUE_REQUEST): once, said first (it ends us), or why not
[ -f "$REQUEUE_REQUEST" ] && rm "$REQUEUE_REQUEST" && echo "== requeueing ==" && { scontrol requeue "$SLURM_JOB_ID" \
  || echo "ERROR: job $SLURM_JOB_ID not requeued: no scontrol in the job script either (see the stop line)" >&2; }
exit "$rc"
