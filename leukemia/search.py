"""The Optuna side of ``search``: the search space, the storage, the study. No MLflow here.

A search YAML names the configuration every trial starts from and the dimensions to search::

    base: experiments/demo.yaml     # an experiments YAML (training fields + preprocess block)
    objective: f1_macro             # validation macro F1 (maximised) or loss (minimised)
    pruner: median                  # median | hyperband | none
    sampler_seed: 0                 # TPESampler(seed=...)
    space:
      kernel_size: {low: 3, high: 9}          # odd sizes only
      kernel_shape: [ellipse, rect, cross]
      phase2_lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      dropout: false                          # a dimension that is off

A dimension is on when it is listed and not ``false``. Ranges are ``{low, high, log}``, choices
a list; each is checked against ``DIMENSIONS`` (which config it sets, its type and the bounds
it may take), so a bad space fails before any trial starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna

from . import yamlfile
from .config import PREPROCESS_FIELDS
from .segmentation import CHANNELS, KERNEL_SHAPES, OUTPUTS, STAIN_NORMS
from .urls import redacted


@dataclass(frozen=True)
class Dimension:
    target: str  # "train" (TrainConfig field) or "preprocess" (PreprocessConfig field)
    kind: str  # "int", "float" or "choice"
    bounds: tuple = ()  # (min, max) a range may span, for int and float
    choices: tuple = ()  # what a choice may hold


DIMENSIONS = {
    "kernel_size": Dimension("preprocess", "int", (3, 15)),
    "kernel_shape": Dimension("preprocess", "choice", choices=tuple(KERNEL_SHAPES)),
    "channel": Dimension("preprocess", "choice", choices=CHANNELS),
    "segment": Dimension("preprocess", "choice", choices=(True, False)),
    "output": Dimension("preprocess", "choice", choices=OUTPUTS),
    "stain_norm": Dimension("preprocess", "choice", choices=STAIN_NORMS),
    "phase1_lr": Dimension("train", "float", (1e-7, 1.0)),
    "phase2_lr": Dimension("train", "float", (1e-7, 1.0)),
    "weight_decay": Dimension("train", "float", (1e-8, 1.0)),
    "dropout": Dimension("train", "float", (0.0, 0.95)),
    "unfreeze_last": Dimension("train", "int", (1, 1000)),
    "colour_jitter": Dimension("train", "float", (0.0, 0.95)),
    "exposure_norm": Dimension("train", "choice", choices=(True, False)),
    "exposure_jitter": Dimension("train", "float", (0.0, 3.0)),
}
OBJECTIVES = {"f1_macro": "maximize", "loss": "minimize"}
PRUNERS = ("median", "hyperband", "none")
_KEYS = ("base", "objective", "pruner", "sampler_seed", "space")


@dataclass(frozen=True)
class SearchSpace:
    base: str  # path of the experiments YAML every trial starts from
    dimensions: dict  # name -> {"low", "high", "log"} or {"choices": [...]}, the ones that are on
    objective: str = "f1_macro"
    pruner: str = "median"
    sampler_seed: int = 0
    overrides: tuple = ()  # (field, value) pairs every trial applies to the base (--field VALUE)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def fingerprint(self) -> str:
        """What a study was made for: the same name with another space is refused."""
        text = json.dumps(
            {
                "base": self.base,
                "dimensions": self.dimensions,
                "objective": self.objective,
                "overrides": list(self.overrides),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def split(self, params: dict) -> tuple[dict, dict]:
        """Chosen values as (training overrides, preprocessing overrides), the fixed
        overrides included."""
        chosen: dict[str, dict] = {"train": {}, "preprocess": {}}
        for name, value in self.overrides:
            chosen["preprocess" if name in PREPROCESS_FIELDS else "train"][name] = value
        for name, value in params.items():
            chosen[DIMENSIONS[name].target][name] = value
        return chosen["train"], chosen["preprocess"]

    def suggest(self, trial: optuna.Trial) -> tuple[dict, dict]:
        """The trial's (training overrides, preprocessing overrides)."""
        chosen: dict[str, dict] = {"train": {}, "preprocess": {}}
        for name, spec in self.dimensions.items():
            dimension = DIMENSIONS[name]
            if dimension.kind == "choice":
                value = trial.suggest_categorical(name, list(spec["choices"]))
            elif dimension.kind == "int":
                step = 2 if name == "kernel_size" else 1  # odd kernels from an odd low
                value = trial.suggest_int(name, spec["low"], spec["high"], step=step)
            else:
                value = trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])
            chosen[dimension.target][name] = value
        return self.split({**chosen["train"], **chosen["preprocess"]})


def load_space(path: str | os.PathLike, objective: str | None = None) -> SearchSpace:
    """Read and check a search YAML (see the module); ``objective`` overrides its own."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"search space {str(path)!r} {yamlfile.not_a_file(path)}; expected a search YAML"
        )
    try:
        loaded = yamlfile.load(path, f"search space {str(path)!r}") or {}
    except OSError as error:
        raise ValueError(f"search space {str(path)!r} cannot be read: {error.strerror}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"search space {str(path)!r} must be a mapping with keys {_KEYS}")
    unknown = sorted(set(loaded) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {str(path)!r}; valid keys: {_KEYS}")
    objective = objective or loaded.get("objective", "f1_macro")
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {objective!r}")
    pruner = loaded.get("pruner", "median")
    if not isinstance(pruner, str) or pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS}, got {pruner!r}")
    sampler_seed = loaded.get("sampler_seed", 0)
    if isinstance(sampler_seed, bool) or not isinstance(sampler_seed, int) or sampler_seed < 0:
        raise ValueError(
            f"sampler_seed in {str(path)!r} must be a whole number >= 0, got {sampler_seed!r}"
        )
    if "base" not in loaded:
        raise ValueError(f"{str(path)!r} names no base config; expected base: experiments/X.yaml")
    space = loaded.get("space")
    if not isinstance(space, dict) or not space:
        raise ValueError(
            f"{str(path)!r} has an empty search space; list dimensions under space: "
            f"(valid: {', '.join(DIMENSIONS)})"
        )
    dimensions = {}
    for name, spec in space.items():
        if name not in DIMENSIONS:
            raise ValueError(
                f"unknown search dimension {name!r}; valid ones: {', '.join(DIMENSIONS)}"
            )
        if spec is False or spec is None:
            continue  # switched off
        dimensions[name] = _checked(name, spec, DIMENSIONS[name])
    if not dimensions:
        raise ValueError(f"every dimension of {str(path)!r} is off; switch at least one on")
    return SearchSpace(
        base=str(loaded["base"]),
        dimensions=dimensions,
        objective=objective,
        pruner=pruner,
        sampler_seed=sampler_seed,
    )


def _checked(name: str, spec, dimension: Dimension) -> dict:
    if dimension.kind == "choice":
        if not isinstance(spec, list) or not spec:
            raise ValueError(f"{name} must be a non-empty list of {list(dimension.choices)}")
        bad = [c for c in spec if c not in dimension.choices]
        if bad:
            raise ValueError(f"{name} choices {bad} are not among {list(dimension.choices)}")
        return {"choices": list(dict.fromkeys(spec))}
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
        raise ValueError(f"{name} must be a range {{low: ..., high: ...}}, got {spec!r}")
    number = int if dimension.kind == "int" else float
    try:
        low, high = number(spec["low"]), number(spec["high"])
    except (TypeError, ValueError):
        raise ValueError(f"{name} bounds must be {number.__name__}s, got {spec!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} bounds must be finite numbers, got [{low}, {high}]")
    smallest, largest = dimension.bounds
    if low > high:
        raise ValueError(f"{name}: low {low} is above high {high}")
    if low < smallest or high > largest:
        raise ValueError(f"{name} must lie in [{smallest}, {largest}], got [{low}, {high}]")
    if name == "kernel_size" and (low % 2 == 0 or high % 2 == 0):
        raise ValueError(f"kernel_size bounds must be odd, got [{low}, {high}]")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{name}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ValueError(f"{name}: a log range needs low > 0, got {low}")
    return {"low": low, "high": high, "log": log}


# --- storage and study ------------------------------------------------------------------------


# An RDB storage's heartbeat: a worker in a trial records one every HEARTBEAT_INTERVAL_S; a
# RUNNING trial silent for HEARTBEAT_GRACE_S (its worker died, on any machine) is failed by the
# next worker that starts a trial, and retried once.
HEARTBEAT_INTERVAL_S = 60
HEARTBEAT_GRACE_S = 180
_CREATE_ATTEMPTS = 3  # tries at opening an RDB storage whose tables others may be creating


def open_storage(spec: str, warn=print, on_stale=None):
    """An Optuna storage from ``spec``: an RDB URL (``postgresql://``, ``sqlite:///``, ...) or
    a journal file path (several processes on one machine). ``on_stale(trial)`` is called for
    each trial an RDB storage's heartbeat fails (after its retry is queued)."""
    if "://" not in spec:
        from .journal import open_journal

        return open_journal(spec, warn)
    if spec.startswith("sqlite:"):
        warn(
            "SQLite storage is for one worker; for several on one machine use a journal file "
            "(--storage PATH), across machines PostgreSQL"
        )
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    try:
        for attempt in range(1, _CREATE_ATTEMPTS + 1):
            try:
                return _rdb_storage(spec, on_stale)
            except (IntegrityError, ProgrammingError):
                # Workers that start at once on an empty database race to create Optuna's
                # tables ("duplicate key ... pg_type_typname_nsp_index"): the losers find
                # them made on another try. A lasting error is the same error each time.
                if attempt == _CREATE_ATTEMPTS:
                    raise
                time.sleep(0.5 * attempt)
    except Exception as error:  # SQLAlchemy's errors, whichever driver the URL names
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot open Optuna storage {redacted(spec)!r}: {first}") from None


def holds_password(url: str) -> bool:
    """Whether a storage URL carries a password (``user:pw@`` or ``?password=``)."""
    return redacted(url) != url


def check_storage_secret(url: str, under_mlflow_run: bool) -> None:
    """Refuse a password in the storage URL under ``mlflow run``, which prints the command and
    logs every ``-P`` value as a run parameter, so the password would stay in the store."""
    if under_mlflow_run and holds_password(url):
        raise ValueError(
            f"the storage URL {redacted(url)!r} holds a password, and `mlflow run` prints and "
            "logs -P values as run parameters; drop it from the URL and give it through "
            "PGPASSWORD or ~/.pgpass (PostgreSQL reads both)"
        )


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose heartbeat outlives a storage that is away for a while."""

    def record_heartbeat(self, trial_id: int) -> None:
        # Optuna's heartbeat thread dies with a traceback on the first failed beat; with the
        # storage away, the next beat tries again, and the trial's own next call to the
        # storage is the error the worker reports (storage_unreachable).
        try:
            super().record_heartbeat(trial_id)
        except Exception as error:  # noqa: BLE001 - the thread's only other way out
            if not storage_unreachable(error):
                raise


def _rdb_storage(spec: str, on_stale):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and work
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=1)

        def stale(study, trial):
            retry(study, trial)
            if on_stale is not None:
                on_stale(trial)

        return _Storage(
            spec,
            engine_kwargs={"pool_pre_ping": True},
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S,
            heartbeat_stale_trial_callback=stale,
        )


def storage_unreachable(error: BaseException) -> str | None:
    """The driver's first line when ``error`` (or what caused it: Optuna wraps it in
    ``StorageInternalError``) is an RDB storage that cannot be reached: the server down,
    restarting, or the connection lost. None for any other error."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OperationalError, InterfaceError)):
            original = getattr(error, "orig", None) or error
            return str(original).strip().splitlines()[0] if str(original).strip() else repr(error)
        error = error.__cause__ or error.__context__
    return None


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)


_STUDY_NAME = re.compile(r"[^./\\\x00-\x1f\x7f-][^/\\\x00-\x1f\x7f]{0,127}")


def check_study_name(name: str) -> str:
    """``name`` if it is a name: at most 128 characters, no path separator (``/`` or ``\\``)
    or control character, not starting with ``.`` or ``-``. It becomes a folder under
    ``searches/``, so a separator, ``..`` or an absolute path would write elsewhere."""
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name):
        raise ValueError(
            f"study name {name!r} is not a name; expected at most 128 characters without '/', "
            "'\\' or control characters, not starting with '.' or '-'"
        )
    return name


SEED_ATTR = "sampler_seed"  # each trial's: the seed of the sampler of the worker that ran it


def worker_seed(sampler_seed: int, created: bool, worker: str) -> int:
    """The sampler seed of one worker: the space's ``sampler_seed`` for the worker that created
    the study (one worker with a seed gives the same study every time), else one derived from
    it and the worker's process token (``processes.token``), so workers that join never draw
    the same trials because they share a seed (they did: trials in identical pairs)."""
    if created:
        return sampler_seed
    digest = hashlib.sha256(f"{sampler_seed}:{worker}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def create_or_load(
    storage, name: str, space: SearchSpace, worker: str = ""
) -> tuple[optuna.Study, bool]:
    """The study ``name`` and whether this call created it: created if absent, loaded
    otherwise (the storage lets one of N workers that start at once create it). A study of that
    name made for another space is refused. Its sampler is seeded ``worker_seed``'s way, the
    seed kept as ``study.sampler_seed``."""
    check_study_name(name)
    options = {
        "storage": storage,
        "study_name": name,
        "sampler": optuna.samplers.TPESampler(seed=space.sampler_seed),
        "pruner": make_pruner(space.pruner),
    }
    try:
        study = optuna.create_study(direction=space.direction, load_if_exists=False, **options)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        seed = worker_seed(space.sampler_seed, False, worker)
        options["sampler"] = optuna.samplers.TPESampler(seed=seed)
        study, created = optuna.load_study(**options), False
    study.sampler_seed = worker_seed(space.sampler_seed, created, worker)
    recorded = study.user_attrs.get("space")
    if recorded is None:
        study.set_user_attr("space", space.fingerprint())
        study.set_user_attr("dimensions", space.dimensions)
    elif recorded != space.fingerprint():
        raise ValueError(
            f"study {name!r} exists with another search space, base, objective or --FIELD "
            "overrides; use another --study-name, or the same space and options as before"
        )
    if study.direction.name.lower() != space.direction:
        raise ValueError(f"study {name!r} was made to {study.direction.name.lower()} its value")
    return study, created


PROCESS_ATTR = "process"  # host:pid:start of the worker running a trial (processes.token)


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker (on this host) is gone: a journal storage has
    no heartbeat, so a worker killed mid-trial would leave its trial RUNNING for ever. Returns
    their numbers."""
    from . import processes

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = trial.user_attrs.get(PROCESS_ATTR)
        if owner and processes.is_gone(owner):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            failed.append(trial.number)
    return failed


def macro_f1(confusion) -> float:
    """Macro F1 from a C x C confusion matrix (rows true, columns predicted); a class with no
    true and no predicted image counts 0, as scikit-learn's ``zero_division=0``."""
    scores = []
    for c, row in enumerate(confusion):
        true_positive = row[c]
        predicted = sum(r[c] for r in confusion)
        actual = sum(row)
        denominator = predicted + actual
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return sum(scores) / len(scores)
