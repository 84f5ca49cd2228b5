"""The arms of the comparison, in one table that every caller reads.

A deep arm trains the EfficientNet on one kind of preprocessed image: ``baseline`` on the
resized RGB images, ``proposed`` on the paper's segmentation. A shortcut arm fits colour or
brightness histograms + logistic regression on one arm's images, to show how far stain colour
alone goes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    name: str  # the run's ``arm`` tag
    segment: bool  # the images it reads are segmented (the proposed arm's)
    features: str | None = None  # shortcut arms: "rgb" or "gray" histograms; None: deep


ARMS = (
    Arm("baseline", segment=False),
    Arm("proposed", segment=True),
    Arm("shortcut-rgb", segment=False, features="rgb"),
    Arm("shortcut-gray", segment=False, features="gray"),
    Arm("shortcut-gray-segmented", segment=True, features="gray"),
)
DEEP_ARMS = tuple(a.name for a in ARMS if a.features is None)
SHORTCUT_ARMS = tuple(a for a in ARMS if a.features is not None)


def deep_arm(segment: bool) -> str:
    """The deep arm that trains on segmented (True) or raw (False) images."""
    return next(a.name for a in ARMS if a.features is None and a.segment == bool(segment))


def by_name(name: str) -> Arm:
    return next(a for a in ARMS if a.name == name)
