#!/usr/bin/env bash
# One stage of a run as a Slurm job. Resources and the warning signal come from the run's config
# (cluster.*), exactly as `python launch/pipeline.py --cluster` gives them to submitit:
#
#   slurm/stage.sh STAGE --config RUN_DIR/config.json [KEY=VALUE ...]   # submit; prints the job id
#   python launch/pipeline.py --emit-sbatch STAGE --config C             # just print the job script
#
# STAGE: any stage of the registry in runtime/stages.py (data, vqvae, encode, prior, sample, classifier, ...).
# Run under `sbatch` directly (as the slurm/train_*.sh aliases allow), the job runs in whatever allocation
# sbatch was given.
# Inside the job: one launcher per node (srun), which starts the stage (runtime/launcher.py); exit 75
# (checkpoint saved on the warning signal or SIGTERM) requeues the job, which then resumes.
set -euo pipefail
if [ -z "${SLURM_JOB_ID:-}" ]; then
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    python="${root}/.venv/bin/python"
    [ -x "$python" ] || python=python3
    script="$("$python" "$root/launch/pipeline.py" --emit-sbatch "$@")"
    mkdir -p "$root/logs"
    exec sbatch --parsable <<<"$script"
fi
set +e  # run_requeueable inspects the step's exit status itself
source "${LESION_VQ_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
stage="$1"
shift
run_requeueable srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m runtime.launcher stage "$stage" "$@"
