"""What the MLflow UI shows a user: the experiment's kind, run names and descriptions, images in
the chart view, and the links that open the pages answering the question.

- Experiments the project writes to are tagged ``mlflow.experimentKind`` =
  ``custom_model_development`` (the 3.x UI then opens on runs, not on GenAI pages).
- A run's description (``mlflow.note.content``, markdown at the top of its page) says what it
  is and, once known, its result: a train run its arm, data, config and test metrics; a compare
  parent the table per arm, the paired statistics and the shortcut floor.
- Confusion matrices go to ``mlflow.log_image`` with a key and a step (validation per epoch,
  test at the end), so the chart view shows them side by side for the selected runs.
"""

from __future__ import annotations

import json
import urllib.parse

import mlflow
import numpy as np

from . import record as rec
from . import urls

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"
RUN_NAME_TAG = "mlflow.runName"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def mark_experiment(experiment_id: str) -> None:
    """Tag the experiment as model development, unless it already says what it is."""
    client = mlflow.tracking.MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def describe(run_id: str, markdown: str, name: str | None = None) -> None:
    """Set a run's description (and, with ``name``, its name in the runs table)."""
    client = mlflow.tracking.MlflowClient()
    client.set_tag(run_id, NOTE_TAG, markdown)
    if name:
        client.set_tag(run_id, RUN_NAME_TAG, name)


def _figure_pixels(figure) -> np.ndarray:
    """An H x W x 3 uint8 rendering of a matplotlib figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure_image(key: str, figure, step: int) -> None:
    """A matplotlib figure as image ``key`` at ``step`` (the chart view's image cards)."""
    mlflow.log_image(_figure_pixels(figure), key=key, step=int(step))


def log_confusion_image(key: str, counts, step: int) -> None:
    """A confusion matrix (rows true, columns predicted) as image ``key`` at ``step``."""
    from . import figures

    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    figure = figures.confusion_figure(counts.astype(int), normalized=normalized)
    log_figure_image(key, figure, step)


# --- links, for `mlflow ui`'s default address (or the tracking server itself) --------------


def _base() -> str:
    uri = urls.redacted(mlflow.get_tracking_uri())  # a printed link is a message too
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{_base()}/#/experiments/{experiment_id}/runs/{run_id}"


def compare_url(experiment_id: str, run_ids) -> str:
    """The compare view (parameters, metrics and plots side by side) of ``run_ids``."""
    runs = urllib.parse.quote(json.dumps(list(run_ids)))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{_base()}/#/compare-runs?runs={runs}&experiments={experiments}"


# A saved view of the runs page, as the 3.17 UI's "Views > Save as new view" stores it: an
# experiment tag whose value holds the page state, deflated and base64-encoded. The URL's
# viewStateShareKey opens it. Group by the arm tag: one curve per arm (its seeds' mean and
# band), one colour each; image cards draw only for runs, not groups, so the view has none.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_LINES = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")
VIEW_BARS = ("test_accuracy", "test_f1_macro", "robust_worst_accuracy")
VIEW_END_IMAGES = ("test_confusion", "curves")  # logged at step 0 (see log_figure_image)
ARM_GROUPS = {
    "aggregateFunction": "average",
    "groupByKeys": [{"mode": "tag", "groupByData": "arm"}],
}


def save_study_view(experiment_id: str, parent_run_id: str, name: str) -> str:
    """Save the chart view of one study's children grouped by arm as a view of the
    experiment; returns its key (``view_url`` opens it)."""
    lines = [
        _card("LINE", key)
        | {"lineSmoothness": 0, "xAxisKey": "step", "scaleType": "linear", "range": {}}
        | {"xAxisScaleType": "linear", "selectedXAxisMetricKey": "", "yAxisKey": "metric"}
        | {"yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": True}
        | {"useGlobalLineSmoothing": True}
        for key in VIEW_LINES
    ]
    state = _view_state(
        f"tags.mlflow.parentRunId = '{parent_run_id}'",
        ARM_GROUPS,
        "The arms, mean over seeds",
        lines + [_card("BAR", key) for key in VIEW_BARS],
    )
    return _save_view(experiment_id, study_view_key(parent_run_id), name, state)


def save_images_view(experiment_id: str, parent_run_id: str, name: str) -> str:
    """Save the image cards of one study's train runs, side by side, as a view of the
    experiment; returns its key. The cards open at step 0, where each run's end-of-training
    images are (the validation confusion matrices start at epoch 1: move the slider), and
    without the run's parameters above each image (the card's default: a few dozen
    ``key=value`` pairs push the image out of sight)."""

    def image_card(name: str, keys: tuple, step: int) -> dict:
        card = {k: v for k, v in _card("IMAGE", name).items() if k != "metricKey"}
        return card | {"imageKeys": list(keys), "step": step, "showRunParams": False}

    # Several keys in one card: a table, a row per image and a column per run.
    images = [
        image_card("end of training", VIEW_END_IMAGES, 0),
        image_card("val_confusion", ("val_confusion",), 1),  # epoch 1; the slider moves on
    ]
    state = _view_state(
        # Deep arms only: a shortcut run logs no images (and no config.seed).
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.step = 'train' "
        f"and params.`{rec.CONFIG}seed` != ''",
        ARM_GROUPS,
        "Each run's images at the end of training",
        images,
        grouped_values=False,
        layout={"columns": 1, "cardHeight": 640},  # one card per row: every run side by side
    )
    return _save_view(experiment_id, images_view_key(parent_run_id), f"{name}: images", state)


def _card(kind: str, key: str) -> dict:
    common = {"uuid": f"{kind.lower()}-{key}", "type": kind, "runsCountToCompare": 10}
    common |= {"metricSectionId": "study", "deleted": False, "isGenerated": False}
    return {**common, "displayName": key, "metricKey": key}


def _view_state(
    search: str,
    group_by: dict | None,
    section: str,
    cards: list,
    grouped_values: bool = True,
    layout: dict | None = None,
) -> dict:
    return {
        "searchFilter": search,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "groupBy": group_by,
        "useGroupedValuesInCharts": grouped_values,
        "hideEmptyCharts": True,
        "chartsSearchFilter": "",
        "compareRunSections": [
            {"uuid": "study", "name": section, "display": True}
            | {"isReordered": False, "deleted": False, "isGenerated": False}
            | (layout or {})  # columns (3) and cardHeight (360 px): the section's grid
        ],
        "compareRunCharts": cards,
    }


def _save_view(experiment_id: str, key: str, name: str, state: dict) -> str:
    import base64
    import time
    import zlib

    packed = base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    now = int(time.time() * 1000)
    value = {"name": name, "createdAt": now, "updatedAt": now, "state": f"deflate;{packed}"}
    mlflow.tracking.MlflowClient().set_experiment_tag(
        experiment_id, VIEW_TAG_PREFIX + key, json.dumps(value)
    )
    return key


def study_view_key(parent_run_id: str) -> str:
    return f"study-{parent_run_id}"


def images_view_key(parent_run_id: str) -> str:
    return f"images-{parent_run_id}"


def view_url(experiment_id: str, key: str) -> str:
    """The runs page opened on a saved view, in its chart mode."""
    page = f"{_base()}/#/experiments/{experiment_id}/runs"
    return f"{page}?viewStateShareKey={urllib.parse.quote(key)}&compareRunsMode=CHART"


# --- descriptions ---------------------------------------------------------------------------


def _mean_sd(entry: dict, metric: str) -> str:
    return f"{entry[f'{metric}_mean']:.3f} ± {entry[f'{metric}_sd']:.3f}"


def verdict(tests: dict) -> str:
    """The study's answer in one line: the first deep arm against the baseline (the paper's
    question when it is ``proposed``), pooled over seeds, with McNemar's p per seed."""
    pairs = [p for p in tests["pooled"] if p.endswith("_vs_baseline")]
    if not pairs:
        best = tests.get("best_shortcut")
        pairs = [p for p in tests["pooled"] if best and p.endswith(f"_vs_{best}")]
    if not pairs:
        return "One deep arm and no shortcut arm: nothing to pair."
    pair = pairs[0]
    a, b = pair.split("_vs_")
    pooled = tests["pooled"][pair]
    p_values = ", ".join(f"{e[pair]['p_value']:.2g}" for e in tests["per_seed"].values())
    what = "segmentation" if a == "proposed" and b == "baseline" else a
    if pooled["low"] > 0:
        reading = f"{what} helped"
    elif pooled["high"] < 0:
        reading = f"{what} did not help: it cost accuracy"
    else:
        reading = f"no difference shown between {a} and {b}"
    return (
        f"**{a} − {b}: {100 * pooled['difference']:+.1f} points [{100 * pooled['low']:+.1f}, "
        f"{100 * pooled['high']:+.1f}], McNemar p {p_values}: {reading}.**"
    )


def compare_note(table: dict, tests: dict, seeds, what: str) -> str:
    """The compare parent's description: the verdict first, then the table, from the logged
    statistics."""
    lines = [
        verdict(tests),
        "",
        f"**{' vs '.join(tests['deep_arms'])}**: {what}; seeds {', '.join(map(str, seeds))} "
        "(mean ± sd over seeds, test split).",
        "",
        "| arm | accuracy | F1 macro | seeds |",
        "| --- | --- | --- | --- |",
    ]
    for arm, entry in table.items():
        n = len(entry["per_seed"]) if not arm.startswith("shortcut") else 1
        lines.append(
            f"| {arm} | {_mean_sd(entry, 'test_accuracy')} | "
            f"{_mean_sd(entry, 'test_f1_macro')} | {n} |"
        )
    for pair, pooled in tests["pooled"].items():
        a, b = pair.split("_vs_")
        lines += [
            "",
            f"**{a} − {b}** (accuracy difference, paired 95% bootstrap interval, exact McNemar p):",
            "",
            "| seed | difference | 95% interval | McNemar p |",
            "| --- | --- | --- | --- |",
        ]
        for seed, entry in tests["per_seed"].items():
            result = entry[pair]
            lines.append(
                f"| {seed} | {result['difference']:+.3f} | "
                f"[{result['low']:+.3f}, {result['high']:+.3f}] | {result['p_value']:.3g} |"
            )
        lines.append(
            f"| mean over seeds | {pooled['difference']:+.3f} | "
            f"[{pooled['low']:+.3f}, {pooled['high']:+.3f}] | |"
        )
    best = tests.get("best_shortcut")
    if best:
        floor = table[best]["test_accuracy_mean"]
        lines += [
            "",
            f"**Shortcut floor**: {best} reaches accuracy {floor:.3f} from colour/brightness "
            "statistics alone; a deep arm below it has not shown that it learned morphology.",
        ]
    else:
        lines += ["", "Shortcut arms were not fitted (`--shortcuts false`): no floor to compare."]
    return "\n".join(lines)


def train_note(
    arm: str, seed: int, origin: dict, config, segmentation: dict, metrics: dict | None = None
) -> str:
    """A train run's description: which arm, data and config; its test metrics once known."""
    lines = [
        f"**{arm} arm**, seed {seed}: `{config.model}` at {segmentation['image_size']} px, batch "
        f"{config.batch_size}, config `{origin.get('config', '?')}`, data "
        f"`{origin.get('data_dir', '?')}` (manifest {origin.get('manifest_hash', '?')[:12]}).",
        "",
        f"Preprocessing: {origin.get('preprocessing', '?')}.",
    ]
    if metrics:
        lines += [
            "",
            "| test accuracy | test F1 macro | best epochs (phase 1, phase 2) |",
            "| --- | --- | --- |",
            f"| {metrics['test_accuracy']:.4f} | {metrics['test_f1_macro']:.4f} | "
            f"{metrics.get('phase1_best_epoch', 0):.0f}, "
            f"{metrics.get('phase2_best_epoch', 0):.0f} |",
        ]
    if origin.get("registered"):
        lines += ["", f"Registered as `{origin['registered']}`."]
    return "\n".join(lines)
