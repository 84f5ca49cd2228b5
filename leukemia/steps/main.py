"""The ``main`` step: the whole study under one parent run.

``compare`` (the deep arms x seeds, shortcut arms, statistics), then the registry: the best
deep arm's best registered version is promoted to ``@champion`` when the promotion rules allow
(``registry.decide_and_promote``), and the champion is evaluated on the study's test split as a
nested ``evaluate`` run.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import record as rec
from .. import registry
from . import compare as compare_step
from . import statistics


@dataclass
class StudyResult:
    comparison: compare_step.Comparison
    best_arm: str
    promotion: str  # what happened to @champion, in words
    evaluation: dict | None  # the champion's evaluate result, if it ran


def run_study(
    plan: compare_step.Plan,
    data_dir: str,
    *,
    metric: str,
    min_delta: float,
    registered_model_name: str,
    echo=print,
    **compare_args,
) -> StudyResult:
    """Run the study inside the active run (see the module)."""
    name = registered_model_name
    comparison = compare_step.compare(
        plan, data_dir, registered_model_name=name, echo=echo, **compare_args
    )
    table = comparison.table
    best = max(comparison.tests["deep_arms"], key=lambda arm: table[arm][f"{metric}_mean"])
    best_run = statistics.registered_version(comparison.children[best].values(), metric)
    mlflow.set_tags({rec.STEP: rec.MAIN, rec.BEST_DEEP_ARM: best})
    try:
        if best_run is None:  # never @challenger instead: that may be another arm's model
            raise ValueError(f"no run of the {best} arm is registered as {name!r}")
        decision = registry.decide_and_promote(name, best_run, metric=metric, min_delta=min_delta)
        promotion = (
            f"version {decision.candidate} ({best} arm) "
            f"{'is now @champion' if decision.promote else 'not promoted'}: {decision.reason}"
        )
    except ValueError as error:
        promotion = f"skipped: {error}"
    echo(f"promotion: {promotion}")
    evaluated = None
    try:
        MlflowClient().get_model_version_by_alias(name, registry.CHAMPION)
    except MlflowException:
        return StudyResult(comparison, best, promotion, None)
    try:
        from . import evaluate as evaluate_step  # torch: only once there is a champion

        evaluated = evaluate_step.run(
            f"models:/{name}@{registry.CHAMPION}", comparison.manifest, nested=True
        )
    except ValueError as error:
        echo(f"evaluation of the champion skipped: {error}")
    return StudyResult(comparison, best, promotion, evaluated)
