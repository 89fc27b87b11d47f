# Sourced by the slurm/*.sh job scripts. Edit LESION_VQ_SETUP (or this file) for your site:
# module loads, conda/venv activation. Runs from the directory you called sbatch in (the repo root).
set -uo pipefail
cd "${LESION_VQ_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
if [ -n "${LESION_VQ_SETUP:-}" ]; then
    eval "$LESION_VQ_SETUP"                  # e.g. LESION_VQ_SETUP='module load cuda/12.4'
fi
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
    source .venv/bin/activate                # the venv that scripts/demo.sh / test.sh create
fi
export PYTHONUNBUFFERED=1
EXIT_REQUEUE=75                              # runtime/signals.py: "checkpoint saved, requeue me"

echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" \
     "on ${SLURM_JOB_NODELIST:-?}: ${SLURM_JOB_NAME:-$0} $*"

# Runs a step; on exit 75 (stopped by the warning signal after a checkpoint) requeues this job,
# which then resumes from that checkpoint (--resume auto is the default).
run_requeueable() {
    "$@"
    local status=$?
    if [ "$status" -eq "$EXIT_REQUEUE" ]; then
        echo "[$(date -Is)] checkpoint saved on signal; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "[$(date -Is)] step finished with status $status"
    exit "$status"
}
