# shellcheck shell=bash
# Site set-up for the sbatch wrappers (run-*.sh): each sources this file, if it is there, on the job's first node
# before launching; srun passes everything it sets on to every task. The wrappers look for slurm/site.sh in the
# directory you submit from; SITE_SETUP names another file (sbatch --export=ALL,SITE_SETUP=$HOME/site.sh ...).
# Uncomment and adapt what your cluster needs:
#
# module purge
# module load gcc/12                          # pip's torch brings its own CUDA libraries: a cuda module only
#                                             # to build extensions, and of torch.version.cuda's version (13.0)
# source "$HOME/venvs/torch/bin/activate"     # or: conda activate torch
# export DATA_DIR=/scratch/$USER/data         # where MNIST/ImageNet live (download on the login node)
# Network (docs/network.md says which your fabric needs; check with: sbatch run-gpu8-dist.sh check_interconnect.py)
# export NCCL_SOCKET_IFNAME=ib0               # if NCCL picks the wrong network interface
# export NCCL_IB_HCA=mlx5_0,mlx5_1            # the InfiniBand/RoCE adapters NCCL may use
# export NCCL_IB_GID_INDEX=3                  # RoCE: the GID index of the RoCE v2 address
# export GLOO_SOCKET_IFNAME=ib0               # the same for gloo (CPU runs, and ImageNet's staging store)
