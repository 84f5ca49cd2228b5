"""The ``compare`` step: the comparison the paper made with one run each, done as one
reproducible experiment.

Under one parent run, the deep arms (by default the paper's two: baseline on raw images and
proposed on segmented ones; ``arms`` lists the others) train for every seed as ``mlflow run -e
train`` child runs on one split (checked by manifest hash), plus the shortcut arms. A
finished child with the same config, preprocessing, seed, manifest and code version is reused
rather than retrained, as mlflow's multistep example does.
The parent's artifacts are ``statistics``'s; its description (``ui.compare_note``) the answer.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from .. import children, registry, shortcut, tracking, ui
from .. import record as rec
from ..arms import DEFAULT_DEEP_ARMS, SHORTCUT_ARMS, arm_of, by_name, parse_deep_arms
from ..config import (
    PREPROCESS_FIELDS,
    PreprocessConfig,
    TrainConfig,
    load_experiment,
    resolve_config_path,
)
from ..data import read_manifest, split_fingerprint
from ..slurm import Slurm
from . import preprocess as preprocess_step
from . import statistics


class StudyError(ValueError):
    """The study cannot go on: bad input, or a child run failed."""


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; empty, malformed or repeated seeds are an error."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"seeds must be comma-separated integers like 1,2,3; got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must not repeat, got {text!r}")
    return seeds


def find_project(start: str | os.PathLike | None = None) -> Path:
    """The folder holding ``MLproject``: the working directory (under ``mlflow run``), else the
    checkout the package was installed from."""
    for candidate in (Path(start or os.getcwd()), Path(__file__).resolve().parents[2]):
        if (candidate / "MLproject").is_file():
            return candidate
    raise ValueError(
        "compare launches `mlflow run -e train` children and needs the project checkout "
        "(a folder with MLproject); run it from there"
    )


def reusable_run(
    experiment_id: str,
    arm: str,
    config: TrainConfig,
    manifest_hash: str,
    segmentation: dict,
    registered_as: str = "",
):
    """A FINISHED train run of ``arm`` with the same config, preprocessing, manifest and code
    (and, with ``registered_as``, registered as a version of that model), or None."""
    commit = tracking.git_commit(Path(__file__).parent)
    if not commit or commit.endswith("+dirty"):
        return None  # uncommitted or unknown code: nothing proves an old run used it
    query = (
        f"{rec.query(rec.TRAIN, **{rec.ARM: arm})} and attributes.status = 'FINISHED' "
        f"and params.`{rec.MANIFEST_HASH}` = '{manifest_hash}' "
        f"and params.`{rec.GIT_COMMIT}` = '{commit}'"
    )
    wanted = {f"{rec.CONFIG}{k}": str(v) for k, v in config.to_dict().items()}
    wanted.update({k: str(v) for k, v in tracking.preprocess_params(segmentation).items()})
    for run in MlflowClient().search_runs([experiment_id], query, order_by=["start_time DESC"]):
        registered = run.data.tags.get(rec.REGISTERED_VERSION, "")
        if registered_as and not registered.startswith(f"{registered_as}/"):
            continue  # a run registered elsewhere, or not at all, cannot be promoted here
        if all(run.data.params.get(k) == v for k, v in wanted.items()):
            return run
    return None


_SKLEARN = [f"scikit-learn=={metadata.version('scikit-learn')}"]


def run_shortcut_arm(arm: str, kind: str, processed_dir, parent_id: str) -> str:
    """Fit one shortcut arm and log it as a child run like a deep arm; returns its run id."""
    import mlflow.sklearn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", shortcut.ShortcutWarning)
        result = shortcut.fit_shortcut(processed_dir, kind=kind)
    tags = {
        rec.STEP: rec.TRAIN,
        rec.ARM: arm,
        rec.PROCESSED_DIR: str(Path(processed_dir).resolve()),
    }
    run_id = tracking.create_child_run(parent_id, arm, tags)
    with mlflow.start_run(run_id=run_id, nested=True) as run:
        mlflow.log_params(
            {
                "shortcut.kind": kind,
                "shortcut.C": result.C,
                "shortcut.features": len(result.feature_names),
                rec.MANIFEST_HASH: split_fingerprint(
                    read_manifest(Path(processed_dir, "manifest.csv"))
                ),
            }
        )
        mlflow.log_dict(
            {
                "val_accuracy_by_C": {str(k): v for k, v in result.val_accuracy_by_C.items()},
                "dropped_features": result.dropped_features,
                "warnings": [str(w.message) for w in caught],
            },
            "shortcut.json",
        )
        tracking.log_evaluation(
            # No loss given: the metrics' own mean -log p(true class), as evaluate logs it.
            {"labels": result.test_labels, "probabilities": result.test_probabilities},
            prefix="test_",
            paths=result.test_paths,
            artifact_dir=rec.EVALUATION,
        )
        mlflow.log_metric("fit_seconds", result.seconds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # Its requirements said, not inferred: inference imports the model in a
            # subprocess and took 10 to 16 s per arm here, for the same one line.
            mlflow.sklearn.log_model(result.pipeline, name="model", pip_requirements=_SKLEARN)
        return run.info.run_id


@dataclass
class Plan:
    """A study's input, checked before any run starts."""

    seeds: list[int]
    configs: dict[int, TrainConfig]  # one per seed
    preprocess: PreprocessConfig
    overrides: dict  # config fields given on the command line, passed to every child
    project: Path
    arms: tuple[str, ...] = DEFAULT_DEEP_ARMS  # the deep arms, in order

    def arm_preprocess(self, arm: str) -> PreprocessConfig:
        """The study's preprocessing with what ``arm`` fixes (segment, channel, output)."""
        return replace(self.preprocess, **by_name(arm).preprocess_fields())

    def arm_config(self, arm: str, seed: int) -> TrainConfig:
        """The seed's training config with the knobs ``arm`` turns on (colour jitter)."""
        config = self.configs[seed]
        return replace(config, **by_name(arm).train_fields(config.to_dict()))


def plan(
    config_path,
    seeds: str,
    overrides: dict,
    arms: str = ",".join(DEFAULT_DEEP_ARMS),
) -> Plan:
    """Check seeds, arms, configs, preprocessing and the project; raise ``ValueError`` if
    wrong."""
    seed_list = parse_seeds(seeds)
    deep = parse_deep_arms(arms)
    project = find_project()
    configs = {}
    for seed in seed_list:
        configs[seed], pre = load_experiment(config_path, {**overrides, "seed": seed})
    study = Plan(seed_list, configs, pre, overrides, project, deep)
    for arm in deep:
        # The arm's fields must be valid with the study's, and together name this arm: a run
        # carries the name its preprocessing gives it (``arm_of``), in the registry too.
        named = arm_of(
            study.arm_preprocess(arm).to_dict(), study.arm_config(arm, seed_list[0]).to_dict()
        )
        if named != arm:
            raise ValueError(
                f"with this study's settings the {arm} arm would train as the {named} arm; "
                f"name it {named} in --arms (or change the preprocessing or training options)"
            )
    return study


@dataclass
class Comparison:
    children: dict[str, dict[int, str]]  # arm -> seed -> run id
    table: dict
    tests: dict
    manifest: Path  # the manifest both arms trained and were tested on


def compare(
    study: Plan,
    data_dir: str,
    *,
    config_path,
    out_dir,
    env_manager: str,
    shortcuts: bool,
    registered_model_name: str,
    workers: int = 0,
    executor: str = "local",
    jobs: int | None = None,
    slurm: Slurm | None = None,
    echo=print,
) -> Comparison:
    """The deep arms x seeds as ``mlflow run -e train`` children of the active run, the
    shortcut arms, and the statistics (``statistics``)."""
    made, manifest, manifest_hash = _preprocess_arms(
        study, data_dir, out_dir, workers, shortcuts, echo
    )
    parent = mlflow.active_run()
    _log_parent(study, made, manifest_hash, config_path, env_manager, executor)
    # Every child gets the same data_dir, config and out_dir, and the folder its arm's images
    # are in (``processed``: its name in that store, the hash of the files and options, not a
    # path), so the only parameters that differ between them are the ones that mean something:
    # the images, the arm's training knobs and the seed. A child never preprocesses again.
    shared = {
        "data_dir": data_dir,
        "config": str(resolve_config_path(config_path).resolve()),
        "registered_model_name": registered_model_name,
        **{k: v for k, v in study.overrides.items() if k not in PREPROCESS_FIELDS},
        "out_dir": str(Path(out_dir).resolve()),
    }
    runs, wanted = _reuse_or_plan(study, made, manifest_hash, shared, registered_model_name, echo)
    launch = {"env_manager": env_manager, "executor": executor, "jobs": jobs, "slurm": slurm}
    for (arm, seed, _), run_id in zip(wanted, _launch(study, wanted, parent, echo, **launch)):
        runs[arm][seed] = run_id
    if shortcuts:
        for arm in SHORTCUT_ARMS:
            folder = made[arm.images].out_dir
            run_id = run_shortcut_arm(arm.name, arm.features, folder, parent.info.run_id)
            runs[arm.name] = dict.fromkeys(study.seeds, run_id)
    what = f"config `{config_path}`, data `{data_dir}`, manifest {manifest_hash[:12]}"
    table, tests = _conclude(study, runs, parent.info.run_id, Path(config_path).stem, what)
    return Comparison(runs, table, tests, manifest)


def _preprocess_arms(study: Plan, data_dir, out_dir, workers: int, shortcuts: bool, echo):
    """Every arm's images (the shortcut arms' too), checked to share one split: ``{arm:
    result}``, the first arm's manifest and its split's hash."""
    needed = dict.fromkeys([*study.arms, *(a.images for a in SHORTCUT_ARMS if shortcuts)])
    options = {arm: study.arm_preprocess(arm) for arm in needed}
    try:
        made = preprocess_step.paired(options, data_dir, out_dir, "arms", echo, workers)
    except ValueError as error:
        raise StudyError(str(error)) from None
    manifest = made[study.arms[0]].manifest
    manifest_hash = split_fingerprint(read_manifest(manifest))
    return made, manifest, manifest_hash


def _launch(study: Plan, wanted, parent, echo, *, executor, jobs, **options) -> list[str]:
    """Run the children still wanted; their run ids, in order."""
    if wanted:
        how = f"{executor}" + (f", {jobs} at once" if executor == "local" and jobs else "")
        echo(f"{len(wanted)} train runs (mlflow run -e train) on {how}")
    try:
        return children.run_children(
            [child for _, _, child in wanted],
            project=study.project,
            experiment_id=parent.info.experiment_id,
            parent_id=parent.info.run_id,
            executor=executor,
            jobs=jobs,
            echo=echo,
            **options,
        )
    except children.ChildFailed as error:
        raise StudyError(f"a train run failed: {error}") from None


def _log_parent(study: Plan, made, manifest_hash, config_path, env_manager, executor) -> None:
    mlflow.set_tags({rec.STEP: rec.COMPARE})
    first = study.arms[0]
    shown = "proposed" if "proposed" in made else next((a for a in made if a != "baseline"), first)
    mlflow.log_params(
        {
            "compare.seeds": ",".join(map(str, study.seeds)),
            "compare.arms": ",".join(study.arms),
            "compare.config": config_path,
            "compare.env_manager": env_manager,
            "compare.executor": executor,
            rec.MANIFEST_HASH: manifest_hash,
            # The study's segmentation options, as the paper's arm (or the first
            # segmented one) uses them; each arm's own are its runs' params.
            **tracking.preprocess_params(made[shown].params["segmentation"]),
            **{f"compare.override.{k}": v for k, v in study.overrides.items()},
        }
    )


def _reuse_or_plan(study: Plan, made, manifest_hash, shared, registered_model_name, echo):
    """``{arm: {seed: run id}}`` with the finished runs reused (tagged on the parent), and the
    children still to launch as ``(arm, seed, Child)``."""
    experiment_id = mlflow.active_run().info.experiment_id
    runs: dict[str, dict[int, str]] = {}
    reused, wanted = [], []
    for seed in study.seeds:
        for arm in study.arms:
            runs.setdefault(arm, {})[seed] = ""  # keeps the order: arms as listed
            found = reusable_run(
                experiment_id,
                arm,
                study.arm_config(arm, seed),
                manifest_hash,
                made[arm].params["segmentation"],
                registered_model_name,
            )
            if found is not None:
                echo(f"{arm} seed {seed}: reusing finished run {found.info.run_id}")
                reused.append(found.info.run_id)
                runs[arm][seed] = found.info.run_id
                continue
            fields = by_name(arm).train_fields(study.configs[seed].to_dict())
            parameters = {
                **shared,
                **{k: str(v).lower() if isinstance(v, bool) else v for k, v in fields.items()},
                "processed": made[arm].out_dir.name,
                "seed": seed,
            }
            wanted.append((arm, seed, children.Child(f"{arm} seed {seed}", parameters)))
    if reused:
        mlflow.set_tag(rec.REUSED_RUNS, ",".join(reused))
    return runs, wanted


def _conclude(study: Plan, runs: dict, parent_id: str, config_stem: str, what: str):
    """The parent's record of which run is which, its statistics, best deep arm and
    description; returns the table and tests."""
    # Which run is which arm and seed (reused runs belong to another parent): the report's key.
    mlflow.log_dict(
        {arm: {str(k): v for k, v in by.items()} for arm, by in runs.items()}, rec.CHILDREN
    )
    table, tests = statistics.summarise(runs, study.arms)
    statistics.log_summary(table, tests)
    metric = registry.PROMOTION_METRIC
    best = max(tests["deep_arms"], key=lambda arm: table[arm][f"{metric}_mean"])
    mlflow.set_tag(rec.BEST_DEEP_ARM, best)  # by mean test macro F1; main promotes its version
    seeds = ",".join(map(str, study.seeds))
    name = f"{config_stem} study, seeds {seeds}"
    ui.describe(parent_id, ui.compare_note(table, tests, study.seeds, what), name=name)
    experiment_id = mlflow.active_run().info.experiment_id
    ui.save_study_view(experiment_id, parent_id, name)
    ui.save_images_view(experiment_id, parent_id, name)
    return table, tests
