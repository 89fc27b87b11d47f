#!/usr/bin/env bash
# Train the prior as a Slurm job: slurm/stage.sh prior (resources and warning signal from the config).
#   slurm/train_prior.sh --config RUN_DIR/config.json [KEY=VALUE ...]          # submits with cluster.* of the config
#   sbatch [--nodes=2 ...] slurm/train_prior.sh --config RUN_DIR/config.json   # runs in the allocation you ask for
#SBATCH --job-name=lvq-train-prior
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
exec "${LESION_VQ_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}/slurm/stage.sh" prior "$@"
