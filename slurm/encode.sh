#!/usr/bin/env bash
# Encode image shards into code shards, one array task per slice of shards:
#   sbatch --array=0-3 slurm/encode.sh --config runs/NAME/config.json
# Each task takes every N-th input shard (N = array size) and skips shards already encoded with the
# same checkpoint, so resubmitting after failures redoes only what is missing.
#SBATCH --job-name=lvq-encode
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
srun python vqvae/encode.py "$@"
