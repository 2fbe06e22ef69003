# Site set-up for the sbatch wrappers: sourced by slurm/launch.sh on the first node, before launching.
# Everything here is inherited by srun and so by every task. Uncomment and adapt what your cluster needs,
# or point SITE_SETUP at a file of your own (sbatch --export=ALL,SITE_SETUP=$HOME/site.sh ...).
#
# module purge
# module load cuda/12.4 gcc/12
# source "$HOME/venvs/torch/bin/activate"     # or: conda activate torch
# export DATA_DIR=/scratch/$USER/data         # where MNIST/ImageNet live (download on the login node)
# export NCCL_SOCKET_IFNAME=ib0               # if NCCL picks the wrong network interface
