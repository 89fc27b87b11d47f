#!/usr/bin/env bash
# Sample from the prior and decode, one array task per seed slice:
#   sbatch --array=0-3 slurm/sample.sh --config runs/NAME/config.json
# Task I draws the samples j with j % N == I (N = array size) with its own seed; a finished task is
# skipped on resubmission. The task that completes the set writes samples.png and the manifest.
#SBATCH --job-name=lvq-sample
#SBATCH --array=0-1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=01:00:00
##SBATCH --gpus-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
source "${LESION_VQ_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
srun python prior/sample.py "$@"
