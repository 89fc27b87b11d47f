#!/usr/bin/env bash
# Train the VQ-VAE:  sbatch slurm/train_vqvae.sh --config runs/NAME/config.json [KEY=VALUE ...]
# Edit the #SBATCH lines for your site. Multi-node: raise --nodes; one launcher runs per node and
# starts one process per GPU (or LESION_VQ_PROCS_PER_NODE processes on CPU nodes).
#SBATCH --job-name=lvq-train-vqvae
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=02:00:00
##SBATCH --gpus-per-node=4
##SBATCH --partition=gpu
##SBATCH --account=myproject
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
source "${LESION_VQ_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
run_requeueable srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m runtime.launcher slurm vqvae/train.py "$@"
