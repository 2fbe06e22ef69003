#!/usr/bin/env bash
#SBATCH --job-name=srun-gpu8               # names the log file and shows in squeue
#SBATCH --nodes=2                          # nodes (sbatch --nodes=N overrides)
#SBATCH --ntasks-per-node=4                # one task (process) per GPU
#SBATCH --gpus-per-node=4                  # 4 GPUs on each node
#SBATCH --cpus-per-task=8                  # 8 cores per GPU: for data loading
#SBATCH --mem=128G                         # memory per node
#SBATCH --time=02:00:00                    # wall-clock limit, hh:mm:ss
#SBATCH --output=%x-%j.out                 # log: job name and job id, in the directory you submit from
#SBATCH --signal=USR1@120                  # SIGUSR1 2 min before the time limit: checkpoint, then requeue
#SBATCH --requeue                          # allow the job to put itself back in the queue (scontrol requeue)
#SBATCH --open-mode=append                 # a requeued run appends to the same log
#
# 2 nodes x 4 GPUs, one srun task per GPU: e.g. sbatch run-gpu8.sh mnist_ddp_deepspeed.py --epochs=100 --deepspeed --deepspeed_config ds_config.json
# usage:  sbatch run-gpu8.sh SCRIPT.py [ARGS...]
# No account or partition is set here: add them when you submit (sbatch --account=ACC --partition=PART run-gpu8.sh ...)
# or export SBATCH_ACCOUNT / SBATCH_PARTITION once. Site set-up (modules, venv): slurm/site.sh.
set -euo pipefail
# sbatch runs a spooled copy of this file: ask Slurm where the original is, to reach slurm/launch.sh beside it
wrapper=$(scontrol show job "${SLURM_JOB_ID:?submit this file with sbatch}" -o | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
WRAPPER_NAME=$(basename "$wrapper") exec bash "$(dirname "$wrapper")/slurm/launch.sh" srun "$@"
