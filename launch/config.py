"""Settings of Slurm submission (``cluster``): signals, requeues, setup lines and each stage's resources."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from runtime.schema import MAX_ARRAY_TASKS, MAX_COUNT, MAX_TIME_MIN, Strict


def _slurm_word(value: str) -> str:
    # Written unquoted into an "#SBATCH --partition=..." line: a space or line break would cut the
    # option or inject another line into the batch script; "" would be silently ignored.
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be one word without spaces, line breaks or control characters "
                         "(it goes into an #SBATCH line); use null for the cluster's default")
    return value


SlurmWord = Annotated[str, AfterValidator(_slurm_word)]


def _shell_line(value: str) -> str:
    # Each entry becomes one line of the sbatch script; an embedded line break would smuggle in more.
    if any(c in value for c in "\n\r\x00"):
        raise ValueError("must be a single shell line (found a line break or NUL); "
                         "give each command as its own list entry")
    return value


class SlurmResources(Strict):
    """What one stage's Slurm jobs ask for."""

    partition: SlurmWord | None = Field(None, description="#SBATCH --partition; null = the cluster's default")
    account: SlurmWord | None = Field(None, description="#SBATCH --account; null = the cluster's default")
    qos: SlurmWord | None = Field(None, description="#SBATCH --qos; null = the cluster's default")
    time_min: int = Field(60, gt=0, le=MAX_TIME_MIN, description="time limit of each job, minutes")
    nodes: int = Field(1, gt=0, le=MAX_COUNT,
                       description="nodes per job (training stages: one accelerate machine each)")
    gpus_per_node: int = Field(0, ge=0, le=MAX_COUNT, description="GPUs per node")
    processes_per_node: int = Field(1, gt=0, le=MAX_COUNT,
                                    description="accelerate processes per node (training stages)")
    cpus_per_task: int = Field(2, gt=0, le=MAX_COUNT, description="CPU cores per task")
    mem_gb: int = Field(4, gt=0, le=MAX_COUNT, description="memory per node, GiB")
    constraint: SlurmWord | None = Field(None, description="#SBATCH --constraint; null = none")
    array_parallelism: int = Field(8, gt=0, le=MAX_ARRAY_TASKS,
                                   description="array stages: tasks running at once at most")


def _resources(stage: str) -> object:
    return Field(default_factory=SlurmResources, description=f"Slurm resources of the {stage} stage")


class ClusterConfig(Strict):
    """``cluster``: how ``python launch/pipeline.py --cluster`` submits each stage."""

    signal: Literal["USR1", "USR2", "TERM", "INT"] = Field("USR2", description=(
        "signal Slurm sends before the time limit (the job checkpoints and requeues)"))
    # <= 65535: the largest delay sbatch --signal=SIG@DELAY accepts.
    signal_delay_s: int = Field(120, ge=10, le=65535, description="seconds before the time limit Slurm signals")
    setup: list[Annotated[str, AfterValidator(_shell_line)]] = Field(
        default_factory=list, description="shell lines run first (module load, venv)")
    max_requeues: int = Field(5, ge=0, le=MAX_COUNT, description="requeues of a job before the pipeline gives up")
    data: SlurmResources = _resources("data")  # type: ignore[assignment]
    train_vqvae: SlurmResources = _resources("vqvae")  # type: ignore[assignment]
    encode: SlurmResources = _resources("encode")  # type: ignore[assignment]
    train_prior: SlurmResources = _resources("prior")  # type: ignore[assignment]
    sample: SlurmResources = _resources("sample")  # type: ignore[assignment]
    classifier: SlurmResources = _resources("classifier")  # type: ignore[assignment]
    evaluate: SlurmResources = _resources("evaluate")  # type: ignore[assignment]
    augment: SlurmResources = _resources("augment")  # type: ignore[assignment]
    export: SlurmResources = _resources("export")  # type: ignore[assignment]
    report: SlurmResources = _resources("report")  # type: ignore[assignment]

    @model_validator(mode="after")
    def _signal_before_limit(self) -> ClusterConfig:
        # A stop signal due at or before the job starts would make every job checkpoint and requeue
        # at once, max_requeues times, without doing any work.
        for stage, res in self:
            if not isinstance(res, SlurmResources):
                continue
            minutes = res.time_min
            if minutes * 60 <= self.signal_delay_s:
                raise ValueError(
                    f"cluster.{stage}.time_min={minutes} ({minutes * 60} s) must be longer than "
                    f"cluster.signal_delay_s={self.signal_delay_s}, or Slurm signals the job before it can work; "
                    f"allowed: time_min > {self.signal_delay_s // 60}"
                )
        return self
