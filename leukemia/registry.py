"""The Model Registry: every finished training run registers a version; promotion moves aliases.

Aliases, not the deprecated stages: the newest version is ``@challenger``; ``@champion`` moves
only when a candidate beats it on the same test images (same ``data.manifest_hash``) by at
least ``min_delta`` on the chosen metric, without any class's recall dropping by more than
``recall_tolerance``. Each decision and its reason are recorded as version tags.

Promotions are serialised: ``decide_and_promote`` holds a lock while it reads the champion,
decides and moves the alias, so two promotions at once cannot leave the worse model as
champion. The lock is a registered model ``<name>.promotion-lock``: creating a registered model
is atomic in every MLflow store (a unique name in SQLite, PostgreSQL, or behind a tracking
server), so the lock holds across processes and machines. A lock left by a killed promotion is
taken over once a waiter has seen the same holder for ``LOCK_STALE_S`` on its own clock (never
the server's creation time against the waiter's clock: a clock difference would shorten it).
The alias then moves by compare and set: only if this process still holds the lock and the
champion is still the one it decided against; a promotion that lost its lock (paused past
``LOCK_STALE_S``) stops with one line, and one whose champion changed decides again.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from dataclasses import asdict, dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from .record import TrainRecord

DEFAULT_NAME = "leukemia-classifier"  # the registered model every command uses by default
CHAMPION, CHALLENGER = "champion", "challenger"
RECALL_PREFIX = "test_recall_"
LOCK_SUFFIX = ".promotion-lock"
PROMOTION_METRIC = "test_f1_macro"  # the test metric a candidate must beat the champion on
RECALL_TOLERANCE = 0.05  # the largest drop in any class's recall that still allows promotion
LOCK_STALE_S = 60.0  # a promotion takes about a second; a lock this old was left by a kill
LOCK_WAIT_S = 120.0


def version_tags(run) -> dict[str, str]:
    """What a version is: arm, preprocessing, test metrics, manifest hash, commit, run id."""
    record = TrainRecord.of(run)
    tags = {
        "arm": record.arm,
        "run_id": record.run_id,
        "manifest_hash": record.manifest_hash,
        "git_commit": record.git_commit,
        "model": record.config.get("model", ""),
    }
    tags.update({f"preprocess.{k}": v for k, v in record.preprocessing.items()})
    tags.update({k: f"{v:.6g}" for k, v in record.metrics.items() if k.startswith("test_")})
    return tags


def list_versions(name: str = DEFAULT_NAME) -> list[dict]:
    """Every version of ``name``, newest first, with what ``version_tags`` recorded."""
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"no registered model {name!r}; train a model first") from None
    aliases: dict[str, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    rows = []
    for version in client.search_model_versions(f"name = '{name}'"):
        tags = version.tags
        seen = {
            k.removeprefix("preprocess."): v for k, v in tags.items() if k.startswith("preprocess.")
        }
        rows.append(
            {
                "version": int(version.version),
                "aliases": sorted(aliases.get(str(version.version), [])),
                "arm": tags.get("arm", ""),
                "preprocessing": _preprocessing_words(seen),
                "test_accuracy": tags.get("test_accuracy", ""),
                "test_f1_macro": tags.get("test_f1_macro", ""),
                "manifest_hash": tags.get("manifest_hash", ""),
                "run_id": version.run_id,
                "created": time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(version.creation_timestamp / 1000)
                ),
                "promotion": tags.get("promotion.reason", ""),
            }
        )
    return sorted(rows, key=lambda row: row["version"], reverse=True)


def _preprocessing_words(seen: dict) -> str:
    """``{"segment": "True", "channel": "gray", "kernel_size": "5", ...}`` -> "gray otsu,
    ellipse 5, masked, 224px"; "raw 224px" for the baseline."""
    size = f"{seen['image_size']}px" if "image_size" in seen else ""
    stain = "reinhard stain-normalised" if seen.get("stain_norm") == "reinhard" else ""
    if seen.get("segment") not in ("True", "true"):
        return ", ".join(p for p in (f"raw {size}".strip(), stain) if p) if seen else ""
    parts = [
        stain,
        f"{seen.get('channel', '?')} otsu",
        f"{seen.get('kernel_shape', '?')} {seen.get('kernel_size', '?')}",
        seen.get("output", "?"),
        size,
    ]
    return ", ".join(p for p in parts if p)


def register_run_model(run_id: str, model_uri: str, name: str = DEFAULT_NAME):
    """Register ``model_uri`` (logged by run ``run_id``) as a new version of ``name``, tagged
    with ``version_tags``, and alias it ``challenger`` while it is the newest version. A run
    registered before it was killed is not registered again; resumed, it gets the alias if no
    newer version took it meanwhile (``aliased`` says which did). Returns the ModelVersion."""
    client = MlflowClient()
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        version = found[0]
    else:
        version = mlflow.register_model(model_uri, name, tags=version_tags(client.get_run(run_id)))
    newest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if int(version.version) == newest:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def aliased(name: str, alias: str) -> str | None:
    """The version ``name@alias`` points to now, or None."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@dataclass
class Decision:
    name: str
    candidate: str
    champion: str | None
    metric: str
    candidate_value: float
    champion_value: float | None
    promote: bool
    reason: str
    forced: tuple[str, ...] = ()  # the rules --force overrode: manifest, delta, recall

    def as_dict(self) -> dict:
        return asdict(self)


def _version(client: MlflowClient, name: str, version: str | None):
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"no registered model {name!r}; train a model first") from None
    try:
        if version is None:
            return client.get_model_version_by_alias(name, CHALLENGER)
        if str(version).isdigit():
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, str(version))
    except MlflowException:
        what = f"version or alias {version!r}" if version is not None else f"@{CHALLENGER}"
        raise ValueError(f"registered model {name!r} has no {what}") from None


def _metric(version, metric: str) -> float:
    if metric not in version.tags:
        known = sorted(k for k in version.tags if k.startswith("test_"))
        raise ValueError(
            f"version {version.version} has no metric {metric!r}; expected one of {known}"
        )
    return float(version.tags[metric])


def _drop(old: float, new: float) -> float:
    """How far a recall falls from ``old`` to ``new``; a NaN new recall falls all the way."""
    return math.inf if not math.isfinite(new) else old - new


def decide(
    name: str = DEFAULT_NAME,
    candidate: str | None = None,
    metric: str = PROMOTION_METRIC,
    min_delta: float = 0.0,
    recall_tolerance: float = RECALL_TOLERANCE,
    force: bool = False,
) -> Decision:
    """Whether ``candidate`` (a version number or alias; default ``@challenger``) should
    become ``@champion``. Raises ValueError for bad input or different test manifests (unless
    ``force``); changes nothing."""
    if not min_delta >= 0:  # NaN fails too
        raise ValueError(f"min_delta must be a number >= 0, got {min_delta}")
    if not 0 <= recall_tolerance <= 1:
        raise ValueError(f"recall_tolerance must be in [0, 1], got {recall_tolerance}")
    client = MlflowClient()
    new = _version(client, name, candidate)
    value = _metric(new, metric)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if not math.isfinite(value):  # NaN compares false with everything: it must never win
        return Decision(
            name,
            str(new.version),
            None if champion is None else str(champion.version),
            metric,
            value,
            None if champion is None else _metric(champion, metric),
            False,
            f"{metric} is {value}: a version without a finite {metric} never becomes champion",
        )
    if champion is None:
        return Decision(
            name,
            str(new.version),
            None,
            metric,
            value,
            None,
            True,
            "no champion yet: the first candidate becomes champion",
        )
    old = _metric(champion, metric)
    if str(champion.version) == str(new.version):
        return Decision(
            name,
            str(new.version),
            str(champion.version),
            metric,
            value,
            old,
            False,
            "already champion",
        )
    common = (name, str(new.version), str(champion.version), metric, value, old)
    blocked = {}  # rule -> why it blocks the promotion
    if new.tags.get("manifest_hash") != champion.tags.get("manifest_hash"):
        blocked["manifest"] = (
            f"version {new.version} and champion {champion.version} were tested on different "
            "manifests (manifest_hash differs); their metrics do not compare"
        )
    if value - old < min_delta:
        blocked["delta"] = (
            f"{metric} {value:.4f} vs champion's {old:.4f}: not better by {min_delta}"
        )
    drops = {
        key[len(RECALL_PREFIX) :]: _drop(float(champion.tags[key]), float(new.tags[key]))
        for key in champion.tags
        if key.startswith(RECALL_PREFIX) and key in new.tags
    }
    worst = max(drops.items(), key=lambda item: item[1], default=(None, 0.0))
    if worst[1] > recall_tolerance:
        blocked["recall"] = (
            f"{metric} {value:.4f} vs {old:.4f}, but recall of {worst[0]} drops by "
            f"{worst[1]:.4f} > {recall_tolerance}"
        )
    if not blocked:
        reason = f"{metric} {value:.4f} vs champion's {old:.4f} (>= +{min_delta}); recalls kept"
        return Decision(*common, True, reason)
    if force:
        overridden = "; ".join(f"the {rule} rule ({why})" for rule, why in blocked.items())
        reason = f"forced over {overridden}"
        return Decision(*common, True, reason, forced=tuple(blocked))
    if "manifest" in blocked:
        raise ValueError(blocked["manifest"] + ". Pass --force to promote anyway")
    return Decision(*common, False, next(iter(blocked.values())))


class ChampionMoved(RuntimeError):
    """The champion is no longer the one a decision compared with: decide again."""


@dataclass(frozen=True)
class HeldLock:
    """A promotion lock this process took (``promotion_lock``)."""

    name: str  # the lock's registered model name
    owner: str

    def held(self, client: MlflowClient) -> bool:
        try:
            return client.get_registered_model(self.name).tags.get("owner") == self.owner
        except MlflowException:
            return False  # deleted: taken over as stale


def _compare(client: MlflowClient, decision: Decision, lock: HeldLock) -> None:
    """Raise unless ``lock`` is still this process's and the champion is the decision's."""
    if not lock.held(client):
        raise ValueError(
            f"this promotion of {decision.name!r} lost its lock (it paused for more than "
            f"{LOCK_STALE_S:.0f} s and another promotion took over); @{CHAMPION} not moved, "
            "nothing recorded: run promote again"
        )
    if aliased(decision.name, CHAMPION) != decision.champion:
        raise ChampionMoved(decision.name)


def promote(decision: Decision, dry_run: bool = False, lock: HeldLock | None = None) -> Decision:
    """Apply ``decision``: move ``@champion`` when it says so, and record it as version tags.
    With ``lock`` (``promotion_lock``'s), compare and set: nothing moves unless the lock is still
    held and the champion is still ``decision.champion`` (else ``ValueError`` or
    ``ChampionMoved``)."""
    if dry_run:
        return decision
    client = MlflowClient()
    if lock is not None:
        _compare(client, decision, lock)
    if decision.promote:
        client.set_registered_model_alias(decision.name, CHAMPION, decision.candidate)
    record = {
        "promotion.decision": "promoted" if decision.promote else "kept champion",
        "promotion.reason": decision.reason,
        "promotion.metric": decision.metric,
        "promotion.compared_with": decision.champion or "",
        "promotion.forced": ",".join(decision.forced) or "no",
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in record.items():
        client.set_model_version_tag(decision.name, decision.candidate, key, value)
    return decision


@contextlib.contextmanager
def promotion_lock(name: str, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S):
    """Hold the promotion lock of ``name`` (see the module) for the ``with`` block, which gets
    the ``HeldLock`` to pass to ``promote``."""
    client = MlflowClient()
    lock = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"
    deadline = time.monotonic() + wait_s
    delay = 0.05
    seen: dict = {}  # each holder seen -> when this process first saw it (monotonic)
    while True:
        try:
            client.create_registered_model(
                lock, tags={"owner": owner}, description="held while a promotion runs"
            )
            break
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        _remove_if_stale(client, lock, stale_s, seen)
        if time.monotonic() > deadline:
            raise ValueError(
                f"another promotion of {name!r} holds the lock {lock!r} for more than "
                f"{wait_s:.0f} s; try again, or delete that registered model if no promotion runs"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    try:
        yield HeldLock(lock, owner)
    finally:
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock).tags.get("owner") == owner:
                client.delete_registered_model(lock)


def _holder(client: MlflowClient, lock: str):
    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return None  # released meanwhile
    return held.tags.get("owner"), held.creation_timestamp


def _remove_if_stale(client: MlflowClient, lock: str, stale_s: float, seen: dict) -> None:
    """Delete ``lock`` once this process has seen the same holder for ``stale_s`` seconds of
    its own monotonic clock (``seen`` remembers when it first saw each holder)."""
    holder = _holder(client, lock)
    if holder is None:
        return
    first = seen.setdefault(holder, time.monotonic())
    # Deleted only if it is still the holder that went stale, not one that took over meanwhile.
    if time.monotonic() - first > stale_s and _holder(client, lock) == holder:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def decide_and_promote(
    name: str = DEFAULT_NAME,
    candidate: str | None = None,
    metric: str = PROMOTION_METRIC,
    min_delta: float = 0.0,
    recall_tolerance: float = RECALL_TOLERANCE,
    force: bool = False,
    dry_run: bool = False,
) -> Decision:
    """``decide`` then ``promote``, under the promotion lock unless ``dry_run``: the champion
    the decision compares with is still the champion when the alias moves."""
    if dry_run:
        return decide(name, candidate, metric, min_delta, recall_tolerance, force)
    _version(MlflowClient(), name, candidate)  # a clear error before waiting for the lock
    with promotion_lock(name) as lock:
        for _ in range(3):
            decision = decide(name, candidate, metric, min_delta, recall_tolerance, force)
            try:
                return promote(decision, lock=lock)
            except ChampionMoved:
                continue  # moved by something that does not take the lock: decide again
    raise ValueError(
        f"@{CHAMPION} of {name!r} kept changing while this promotion decided (something moves "
        "it without the promotion lock); nothing moved: run promote again"
    )
