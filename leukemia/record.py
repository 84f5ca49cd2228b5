"""The run record: every name a run is written and read under (tags, params, artifacts), and
the reader of a training run, so that train, compare, search, report, the registry, the
statistics and the UI write and read one record.

Params are prefixed (``config.``, ``preprocess.``, ``data.``, ``runtime.``) so that none
collides with a parameter ``mlflow run`` logs itself from ``-P`` (MLflow refuses a second value
for a key); what a run is (``config.*``, ``preprocess.*``, ``data.*``) is its identity, which
reuse and resume compare. A run started by ``leukemia train`` and one started by ``mlflow run
-e train`` carry the same record: nothing here reads a ``-P`` parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

# Tags: what kind of run it is, and of what.
STEP = "step"  # one of the values below
TRAIN, PREPROCESS, EVALUATE = "train", "preprocess", "evaluate"
COMPARE, MAIN = "compare", "main"  # study parents
SEARCH, SEARCH_TRIAL, SEARCH_CONFIRM = "search", "search-trial", "search-confirm"
ARM = "arm"  # arms.arm_of: the name a run, its description and its registered version carry
PROCESSED_DIR = "data.processed_dir"  # paths differ between machines: tags, not identity
DATA_SOURCE = "data.source"
CONFIG_FILE = "config.file"
HARDWARE = "runtime.hardware"
REGISTERED_VERSION = "registered_version"  # "<model name>/<version>"
BEST_DEEP_ARM = "best_deep_arm"  # on a study parent: the deep arm with the best mean F1
REUSED_RUNS = "compare.reused_runs"  # on a compare parent: finished runs of other parents
TRAINING_STATE = "runtime.state_file"  # a train run's state.pt on its host: what --resume reads
SLURM_JOB = "slurm.job_id"  # a run started as a Slurm job: its job id
SLURM_LOG = "slurm.log"  # and the path of the job's stdout on the shared file system

# Params.
IDENTITY_PREFIXES = ("config.", "preprocess.", "data.")
CONFIG, PREPROCESSING = "config.", "preprocess."
MANIFEST_HASH = "data.manifest_hash"  # equal values: the same split of the same files
GIT_COMMIT = "runtime.git_commit"

# Artifacts.
EVALUATION = "evaluation"  # the test split's evaluation, as evaluate writes it too
PREDICTIONS_FILE = "predictions.csv"  # per image: label, prediction, probabilities
PREDICTIONS = f"{EVALUATION}/{PREDICTIONS_FILE}"
ROBUSTNESS_PREDICTIONS = f"{EVALUATION}/robustness_predictions.csv"  # per image and condition
ROBUSTNESS = f"{EVALUATION}/robustness.json"  # the table: one row per condition
CHILDREN = "children.json"  # on a study parent: {arm: {seed: run id}}
STATISTICS = "statistics.json"  # on a study parent: the paired tests


def query(step: str, **tags: str) -> str:
    """An MLflow search filter for runs of ``step`` with these tag values."""
    parts = [f"tags.{STEP} = '{step}'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())]
    return " and ".join(parts)


@dataclass(frozen=True)
class TrainRecord:
    """What a finished training run says about itself, read from its params and tags."""

    run_id: str
    arm: str
    seed: int | None
    manifest_hash: str
    git_commit: str
    config: dict  # TrainConfig fields as logged (strings)
    preprocessing: dict  # PreprocessConfig fields as logged (the ones the model sees)
    registered_version: str  # "<model>/<version>", or "" when not registered
    metrics: dict

    @classmethod
    def of(cls, run) -> TrainRecord:
        params, tags = run.data.params, run.data.tags
        seed = params.get(f"{CONFIG}seed", "")
        return cls(
            run_id=run.info.run_id,
            arm=tags.get(ARM, ""),
            seed=int(seed) if seed.lstrip("-").isdigit() else None,
            manifest_hash=params.get(MANIFEST_HASH, ""),
            git_commit=params.get(GIT_COMMIT, ""),
            config=_unprefixed(params, CONFIG),
            # Params, not tags: a tag may be set by hand, the params are what the run logged.
            preprocessing=_unprefixed({**tags, **params}, PREPROCESSING),
            registered_version=tags.get(REGISTERED_VERSION, ""),
            metrics=dict(run.data.metrics),
        )

    @property
    def version(self) -> str | None:
        """The registered version's number, or None."""
        return self.registered_version.rsplit("/", 1)[1] if self.registered_version else None


def _unprefixed(values: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
