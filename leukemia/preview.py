"""``preview.png``: original, closed Otsu mask and model input for a few images per class, like
the paper's Fig. 3."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from . import data, images
from .segmentation import SegmentationParams, segment


def write_preview(
    path: Path, root: Path, files: list[data.ImageFile], seg: SegmentationParams, per_class: int
) -> None:
    """A grid like the paper's Fig. 3: original, closed mask and model input, for
    ``per_class`` evenly spaced readable images of each class. Drawn with OpenCV (milliseconds)."""
    if per_class <= 0:
        return
    size, label_width, header = seg.image_size, 190, 28
    full = SegmentationParams(**{**asdict(seg), "segment": True})
    tiles = []
    for class_name in data.CLASSES:
        members = [f for f in files if f.class_name == class_name]
        picks = np.linspace(0, len(members) - 1, min(per_class, len(members))).round()
        for k in sorted(set(picks.astype(int).tolist())):
            path_in = members[k].path
            try:
                result = segment(images.read_image(root / path_in), full)
            except (images.UnreadableImage, OSError):
                continue  # listed in the audit; the preview shows the others
            shown = result["output"] if seg.segment else result["resized"]
            mask = cv2.merge([result["mask"].astype(np.uint8) * 255] * 3)
            label = np.full((size, label_width, 3), 255, np.uint8)
            for line, text in enumerate(
                (class_name, Path(path_in).name, f"t* = {result['threshold']}")
            ):
                cv2.putText(
                    label,
                    text,
                    (6, 24 + 22 * line),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.4,
                    (0, 0, 0),
                    1,
                    cv2.LINE_AA,
                )
            tiles.append(np.hstack([label, result["resized"], mask, shown]))
    titles = np.full((header, label_width + 3 * size, 3), 255, np.uint8)
    for column, text in enumerate(("original", "closed Otsu mask", "model input")):
        cv2.putText(
            titles,
            text,
            (label_width + column * size + 8, 20),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.55,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    grid = np.vstack([titles, *tiles])
    path.write_bytes(images.encode_png(grid))
