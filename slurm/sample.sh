#!/usr/bin/env bash
# Sample from the prior and decode (an array) as a Slurm job: slurm/stage.sh sample (resources and warning signal from the config).
#   slurm/sample.sh --config RUN_DIR/config.json [KEY=VALUE ...]          # submits with cluster.* of the config
#   sbatch [--nodes=2 ...] slurm/sample.sh --config RUN_DIR/config.json   # runs in the allocation you ask for
#SBATCH --job-name=lvq-sample
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
exec "${LESION_VQ_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}/slurm/stage.sh" sample "$@"
