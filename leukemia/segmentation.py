"""The paper's hybrid Otsu + morphological closing operator, as pure array functions.

Per image (uint8 RGB, H x W x 3):

1. resize to ``image_size`` x ``image_size``; with ``stain_norm reinhard`` (not the paper's),
   then match the image's LAB means and standard deviations to a reference fitted on the
   training split (Reinhard et al. 2001, torchstain's implementation): l' = (l - mu) / sigma *
   sigma_ref + mu_ref per LAB channel, so exposure and stain batch no longer set the colours;
2. choose the channel to threshold: grayscale (OpenCV's weights,
   Y = 0.299 R + 0.587 G + 0.114 B), HSV saturation, or the LAB a* channel;
3. Otsu threshold t* = argmax_t w0(t) (mu0(t) - mu_T)^2 + w1(t) (mu1(t) - mu_T)^2, where class 0
   holds the values <= t and class 1 the values > t;
4. binary mask A: the class the cells fall in (``dark``: values <= t*, ``bright``: values > t*);
5. closing I = (A dilate B) erode B with B a ``kernel_size`` structuring element, once;
6. output ``masked`` = ``np.where(I, gray, 0)`` replicated to 3 channels, ``mask`` = I as 0/255
   in 3 channels, ``masked-rgb`` = the RGB image inside I, or ``gray`` = the grayscale image
   itself in 3 channels (steps 3-5 unused).

On bright-field smears the stained cells are darker than the background, so ``dark`` makes the
cells the foreground; the paper's text ("pixels above t* are foreground") is ``bright``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

CHANNELS = ("gray", "saturation", "lab-a")
FOREGROUNDS = ("auto", "dark", "bright")
KERNEL_SHAPES = {"ellipse": cv2.MORPH_ELLIPSE, "rect": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}
# masked: gray * mask (the paper); mask: the closed mask as 0/255; masked-rgb: the original
# colours inside the closed mask, background 0 (the paper's segmentation, stain colour kept);
# gray: the whole grayscale image, no mask (what losing colour costs, without segmentation).
OUTPUTS = ("masked", "mask", "masked-rgb", "gray")
STAIN_NORMS = ("none", "reinhard")
# Where the stained cells sit in each channel: darker than the background in grayscale, more
# saturated and more magenta (higher a*) than the pale background in the other two.
_CELLS_ARE = {"gray": "dark", "saturation": "bright", "lab-a": "bright"}


@dataclass(frozen=True)
class SegmentationParams:
    """Every option that changes a preprocessed image. Defaults are the paper's operator."""

    image_size: int = 224
    segment: bool = True
    channel: str = "gray"
    foreground: str = "auto"
    kernel_size: int = 5
    kernel_shape: str = "ellipse"
    output: str = "masked"
    stain_norm: str = "none"
    # Reinhard's target: the LAB means, then standard deviations (6 numbers), fitted on the
    # training split by preprocess (``fit_stain_reference``) and stored with the model.
    stain_reference: tuple[float, ...] | None = None

    def __post_init__(self):
        _check_choice("stain_norm", self.stain_norm, STAIN_NORMS)
        if self.stain_reference is not None:
            object.__setattr__(self, "stain_reference", check_stain_reference(self.stain_reference))
        _check_choice("channel", self.channel, CHANNELS)
        _check_choice("foreground", self.foreground, FOREGROUNDS)
        _check_choice("kernel_shape", self.kernel_shape, tuple(KERNEL_SHAPES))
        _check_choice("output", self.output, OUTPUTS)
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"image_size must be an integer, got {self.image_size!r}")
        if not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be from 8 to {MAX_IMAGE_SIZE} pixels, got {self.image_size}"
            )
        check_kernel_size(self.kernel_size)

    @property
    def resolved_foreground(self) -> str:
        """``dark`` or ``bright``; ``auto`` picks the side the stained cells are on."""
        return _CELLS_ARE[self.channel] if self.foreground == "auto" else self.foreground

    def to_dict(self) -> dict:
        return {**asdict(self), "resolved_foreground": self.resolved_foreground}


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unsupported {name}, got {value!r}; expected one of {', '.join(choices)}")


# Bounds that keep one image's work within reason: a 224 px image closed with a 255 px element
# is already all foreground; EfficientNet-B7's native size is 600 px.
MAX_KERNEL_SIZE = 255
MAX_IMAGE_SIZE = 2048


def check_kernel_size(kernel_size) -> int:
    """Return ``kernel_size`` if it is an odd integer in [1, MAX_KERNEL_SIZE], else raise."""
    expected = f"kernel_size must be an odd integer from 1 to {MAX_KERNEL_SIZE}"
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, np.integer)):
        raise ValueError(f"{expected}, got {kernel_size!r}")
    if not 1 <= kernel_size <= MAX_KERNEL_SIZE or kernel_size % 2 == 0:
        raise ValueError(f"{expected}, got {kernel_size}")
    return int(kernel_size)


def structuring_element(kernel_size: int = 5, shape: str = "ellipse") -> np.ndarray:
    """The structuring element B: a ``kernel_size`` x ``kernel_size`` uint8 array of 0/1.

    ``ellipse`` with size 5 is ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))``::

        0 0 1 0 0
        1 1 1 1 1
        1 1 1 1 1
        1 1 1 1 1
        0 0 1 0 0
    """
    check_kernel_size(kernel_size)
    _check_choice("kernel_shape", shape, tuple(KERNEL_SHAPES))
    return cv2.getStructuringElement(KERNEL_SHAPES[shape], (kernel_size, kernel_size))


def check_stain_reference(reference) -> tuple[float, ...]:
    """Six finite numbers, the last three (standard deviations) > 0, else ``ValueError``."""
    expected = "a stain reference of 6 finite numbers (LAB means, then standard deviations > 0)"
    try:
        values = tuple(float(v) for v in reference)
    except (TypeError, ValueError):
        raise ValueError(f"expected {expected}, got {reference!r}") from None
    if len(values) != 6 or not np.all(np.isfinite(values)) or min(values[3:]) <= 0:
        raise ValueError(f"expected {expected}, got {reference!r}")
    return values


def _reinhard(reference=None):
    try:  # only where it is used
        from torchstain.numpy.normalizers import NumpyReinhardNormalizer
    except ImportError:
        raise ValueError(
            "stain_norm reinhard needs torchstain, which is not installed here: "
            "pip install 'torchstain>=1.4' (or reinstall leukemia, which lists it)"
        ) from None

    normalizer = NumpyReinhardNormalizer()
    if reference is not None:
        normalizer.target_means = np.asarray(reference[:3], dtype=np.float32)
        normalizer.target_stds = np.asarray(reference[3:], dtype=np.float32)
    return normalizer


def fit_stain_reference(images) -> tuple[float, ...]:
    """Reinhard's reference from S x S x 3 uint8 RGB images (the training split's): the LAB
    means and standard deviations over all their pixels (torchstain's ``fit`` on their
    montage)."""
    images = list(images)
    if not images:
        raise ValueError("cannot fit a stain reference on no images")
    normalizer = _reinhard()
    normalizer.fit(np.concatenate(images, axis=0))
    return check_stain_reference([*normalizer.target_means, *normalizer.target_stds])


def normalise_stain(rgb: np.ndarray, reference) -> np.ndarray:
    """Reinhard normalisation of an H x W x 3 uint8 RGB image to ``reference`` (see the module).
    A flat image (a LAB channel without spread) has no stain to match: returned unchanged."""
    if reference is None:
        raise ValueError("stain_norm reinhard needs the stain reference fitted on training images")
    from torchstain.numpy.utils.rgb2lab import rgb2lab

    # torchstain's own LAB (numpy; no OpenCV thread pool started in a process that forks).
    lab = rgb2lab(np.ascontiguousarray(rgb, dtype=np.float32) / 255)
    if (lab.reshape(-1, 3).std(axis=0) < 1e-3).any():  # float32 noise of a flat channel: 1e-4
        return rgb
    return _reinhard(reference).normalize(rgb)


def resize(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """Resize an H x W x 3 image to ``image_size`` x ``image_size`` (area when shrinking)."""
    height, width = rgb.shape[:2]
    if height == image_size and width == image_size:
        return rgb
    shrinking = height * width > image_size * image_size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(rgb, (image_size, image_size), interpolation=interpolation)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 RGB uint8 -> H x W uint8 with OpenCV's weights 0.299 R + 0.587 G + 0.114 B."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def threshold_channel(rgb: np.ndarray, channel: str = "gray") -> np.ndarray:
    """The H x W uint8 channel Otsu runs on: grayscale, HSV saturation or LAB a*."""
    if channel == "gray":
        return to_gray(rgb)
    if channel == "saturation":
        return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1])
    if channel == "lab-a":
        return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[:, :, 1])
    _check_choice("channel", channel, CHANNELS)
    raise AssertionError("unreachable")


def otsu_threshold(channel: np.ndarray) -> int:
    """Otsu's t* for a uint8 array: the t maximising the between-class variance

    w0(t) (mu0(t) - mu_T)^2 + w1(t) (mu1(t) - mu_T)^2, class 0 = values <= t, class 1 = values > t.
    """
    if channel.dtype != np.uint8:
        raise ValueError(f"otsu_threshold expects a uint8 array, got dtype {channel.dtype}")
    t, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return int(t)


def otsu_mask(channel: np.ndarray, foreground: str = "dark") -> tuple[np.ndarray, int]:
    """Binary mask A (H x W bool) of the foreground side of Otsu's threshold, and t*."""
    _check_choice("foreground", foreground, ("dark", "bright"))
    t = otsu_threshold(channel)
    return (channel <= t) if foreground == "dark" else (channel > t), t


def close_mask(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Morphological closing I = (A dilate B) erode B of a bool mask, applied once.

    As ``cv2.morphologyEx``: outside the image counts as background when dilating and as
    foreground when eroding, so a shape closer to the edge than the element's radius grows to it.
    """
    return _close01(mask.astype(np.uint8), kernel).astype(bool)


def _close01(mask01: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``close_mask`` on a uint8 0/1 mask, without the bool round trips (the hot path)."""
    return cv2.morphologyEx(mask01, cv2.MORPH_CLOSE, kernel)


def resized_image(rgb: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Step 1: the S x S x 3 image, stain-normalised where ``params`` says so."""
    resized = resize(rgb, params.image_size)
    if params.stain_norm == "reinhard":
        return normalise_stain(resized, params.stain_reference)
    return resized


def segment(rgb: np.ndarray, params: SegmentationParams = SegmentationParams()) -> dict:
    """Run the whole operator on one RGB uint8 image.

    Returns ``resized`` (S x S x 3 RGB), ``gray`` (S x S), ``mask`` (S x S bool, closed),
    ``threshold`` (t*) and ``output`` (S x S x 3 uint8: what the model sees).
    """
    resized = resized_image(rgb, params)
    gray = to_gray(resized)
    mask, t = _closed_mask(resized, gray, params)
    if not params.segment:
        output = resized
    elif params.output == "gray":
        output = cv2.merge([gray] * 3)
    elif params.output == "masked-rgb":
        output = resized * mask[:, :, None]
    else:
        output = cv2.merge([_single_plane(gray, mask, params.output)] * 3)
    return {
        "resized": resized,
        "gray": gray,
        "mask": mask.astype(bool),
        "threshold": t,
        "output": output,
    }


def _closed_mask(resized, gray, params: SegmentationParams) -> tuple[np.ndarray, int]:
    """Closed Otsu mask as uint8 0/1, and t*."""
    channel = gray if params.channel == "gray" else threshold_channel(resized, params.channel)
    raw_mask, t = otsu_mask(channel, params.resolved_foreground)
    kernel = structuring_element(params.kernel_size, params.kernel_shape)
    return _close01(raw_mask.view(np.uint8), kernel), t


def _single_plane(gray: np.ndarray, mask01: np.ndarray, output: str) -> np.ndarray:
    """One of the three identical output channels: gray * mask, or the mask as 0/255."""
    return mask01 * np.uint8(255) if output == "mask" else gray * mask01


def preprocess_planes(rgb: np.ndarray, params: SegmentationParams = SegmentationParams()):
    """What ``preprocess`` stores, and the resized grayscale image (for hashing).

    Segmented: the S x S plane that all three model-input channels repeat (``masked-rgb``: the
    S x S x 3 colours inside the mask); baseline: the resized S x S x 3 RGB image.
    ``preprocess_image`` gives the same pixels as three channels.
    """
    resized = resized_image(rgb, params)
    gray = to_gray(resized)
    if not params.segment:
        return resized, gray
    if params.output == "gray":
        return gray, gray
    mask, _ = _closed_mask(resized, gray, params)
    if params.output == "masked-rgb":
        return resized * mask[:, :, None], gray
    return _single_plane(gray, mask, params.output), gray


def preprocess_image(rgb: np.ndarray, params: SegmentationParams = SegmentationParams()):
    """The S x S x 3 uint8 model input for one RGB image (training, evaluation and serving)."""
    image, _ = preprocess_planes(rgb, params)
    return image if image.ndim == 3 else cv2.merge([image] * 3)
