"""The arms of the comparison, in one table that every caller reads.

A deep arm trains the EfficientNet on one kind of preprocessed image: ``baseline`` on the
resized RGB images, ``proposed`` on the paper's segmentation (gray Otsu, 5 x 5 ellipse
closing, gray inside the mask), ``lab-a`` on the same segmentation thresholded on the LAB a
channel (stain colour separates cells from the background better than brightness), and
``masked-rgb`` on the colours inside the paper's mask (segmentation that keeps stain colour),
and ``gray`` on the whole grayscale image (colour lost, no segmentation: it separates what
segmentation costs from what losing colour costs), and ``colour-jitter`` on the resized RGB
images with exposure, contrast, saturation, gamma and hue jittered in training (a model that
cannot lean on the scanner's exposure or the stain batch's colour), and ``stain-norm`` on the
resized RGB images with Reinhard stain normalisation to a reference fitted on the training split
(stored with the model, so the served model applies it), and ``stain-norm-jitter`` both at once,
with a wider jitter (0.6: brightening by 1.4 lies inside its range, not at its edge), and
``exposure-norm`` on the resized RGB images with each image's exposure undone inside the
network (``model.Classifier``: mean intensity scaled to one level, so x0.6 or x1.4 reaches the
backbone as the same image) and colour jitter 0.4 for what scaling cannot undo, and
``exposure-aug`` the same with exposure itself jittered (x/ 1.8, log-uniform, clipped at
white) so that the saturated background of an over-exposed slide is a common training image.
A shortcut arm fits colour or brightness histograms + logistic regression on one arm's
images, to show how far stain colour alone goes; ``shortcut-background`` only the colours
outside the paper's mask, to show how much of the class the background gives away.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    name: str  # the run's ``arm`` tag
    segment: bool  # the images it reads are segmented
    features: str | None = None  # shortcut arms: "rgb" or "gray" histograms; None: deep
    # Preprocessing fields the arm sets on top of the study's (``PreprocessConfig`` names).
    preprocessing: tuple[tuple[str, str], ...] = ()
    # Training knobs the arm turns on (``TrainConfig`` names, numbers that are off at 0) with
    # the value it uses where the study leaves the knob off; a study that sets one keeps its own.
    training: tuple[tuple[str, float | bool], ...] = ()

    @property
    def images(self) -> str:
        """The deep arm whose preprocessed images this arm reads (itself, for a deep arm)."""
        if self.features is None:
            return self.name
        return "proposed" if self.segment else "baseline"

    def preprocess_fields(self) -> dict:
        """The ``PreprocessConfig`` fields this arm fixes, ``segment`` included."""
        return {"segment": self.segment, **dict(self.preprocessing)}

    def train_fields(self, config: dict) -> dict:
        """The ``TrainConfig`` fields this arm sets on a study's ``config`` (its ``to_dict()``):
        each of its knobs at the arm's value unless the study already turns it on."""
        return {k: v for k, v in self.training if not _on(config.get(k))}


def _on(value) -> bool:
    """A training knob counts as on when it is true or a number above 0 (``colour_jitter
    0.4``), as a value or as its logged text (``True``, ``0.4``)."""
    if str(value).lower() == "true":
        return True
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


ARMS = (
    Arm("baseline", segment=False),
    Arm("proposed", segment=True),
    # gray first: its image ignores the channel, so gray with channel lab-a is still gray.
    Arm("gray", segment=True, preprocessing=(("output", "gray"),)),
    Arm("lab-a", segment=True, preprocessing=(("channel", "lab-a"),)),
    Arm("masked-rgb", segment=True, preprocessing=(("output", "masked-rgb"),)),
    # stain-norm-jitter before its two parts: it needs both, each part needs only its own.
    Arm(
        "stain-norm-jitter",
        segment=False,
        preprocessing=(("stain_norm", "reinhard"),),
        training=(("colour_jitter", 0.6),),
    ),
    # exposure-aug before exposure-norm, and both before colour-jitter: each needs the next.
    Arm(
        "exposure-aug",
        segment=False,
        training=(("exposure_norm", True), ("colour_jitter", 0.4), ("exposure_jitter", 0.8)),
    ),
    Arm(
        "exposure-norm",
        segment=False,
        training=(("exposure_norm", True), ("colour_jitter", 0.4)),
    ),
    Arm("colour-jitter", segment=False, training=(("colour_jitter", 0.4),)),
    Arm("stain-norm", segment=False, preprocessing=(("stain_norm", "reinhard"),)),
    Arm("shortcut-rgb", segment=False, features="rgb"),
    Arm("shortcut-gray", segment=False, features="gray"),
    Arm("shortcut-gray-segmented", segment=True, features="gray"),
    Arm("shortcut-background", segment=False, features="background"),
)
DEEP_ARMS = tuple(a.name for a in ARMS if a.features is None)
DEFAULT_DEEP_ARMS = ("baseline", "proposed")  # the paper's two
SHORTCUT_ARMS = tuple(a for a in ARMS if a.features is not None)


def arm_of(segmentation: dict, training: dict | None = None) -> str:
    """The deep arm a run belongs to, the one name a run, its description and its registered
    version carry, from its preprocessing (``preprocess.*`` values) and training settings
    (``TrainConfig`` values; none given: the paper's): the first named arm whose segmentation,
    every preprocessing field and every training knob it matches, else ``proposed`` segmented
    and ``baseline`` not."""
    segment = str(segmentation.get("segment")).lower() == "true"  # a bool, or a logged string
    training = training or {}
    for arm in ARMS:
        if (
            arm.features is None
            and (arm.preprocessing or arm.training)
            and arm.segment == segment
            and all(str(segmentation.get(k)) == v for k, v in arm.preprocessing)
            and all(_on(training.get(k)) for k, _ in arm.training)
        ):
            return arm.name
    return "proposed" if segment else "baseline"


def by_name(name: str) -> Arm:
    return next(a for a in ARMS if a.name == name)


def parse_deep_arms(text: str) -> tuple[str, ...]:
    """``"baseline,proposed,lab-a"`` -> the deep arms, checked; one line if wrong."""
    names = tuple(p.strip() for p in str(text).split(",") if p.strip())
    unknown = [n for n in names if n not in DEEP_ARMS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"arms must be distinct deep arms from {', '.join(DEEP_ARMS)}, comma-separated; "
            f"got {text!r}"
        )
    return names
