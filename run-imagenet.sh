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
# ImageNet on any number of nodes x 4 GPUs: first one staging task per node extracts the archives to node-local
# disk (skipped where a complete copy is already there), then one srun task per GPU trains.
# e.g. sbatch --nodes=2 run-imagenet.sh imagenet_ddp.py --data-dir=/datasets/imagenet --checkpoint-dir=$WRKDIR/ckpt
# usage:  sbatch run-imagenet.sh SCRIPT.py [ARGS...]
# No account or partition is set here: add them when you submit (sbatch --account=ACC --partition=PART run-imagenet.sh ...)
# or export SBATCH_ACCOUNT / SBATCH_PARTITION once. Site set-up (modules, venv): slurm/site.sh.
set -euo pipefail
# sbatch runs a spooled copy of this file: ask Slurm where the original is, to reach slurm/launch.sh beside it
wrapper=$(scontrol show job "${SLURM_JOB_ID:?submit this file with sbatch}" -o | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
WRAPPER_NAME=$(basename "$wrapper") STAGE_FIRST=1 exec bash "$(dirname "$wrapper")/slurm/launch.sh" srun "$@"
