"""Throughput of the served pyfunc against the bare model (prints figures; not a test).

    python benchmarks/serve_speed.py [--model efficientnet_b4] [--image-size 224] [--batch 32]
                                     [--repeats 5] [--data-dir ../shared/data/all]

Served: ``mlflow.pyfunc.load_model(...).predict`` on a DataFrame of ``--batch`` base64 PNGs, so
base64 and PNG decoding, the segmentation, normalisation, the forward pass and the softmax.
Bare: the ``Classifier`` alone on the same images already preprocessed into a normalised float
tensor of the same batch size, in one forward pass, and in the served model's chunks (on a CPU
those are smaller, see ``leukemia.inference.CPU_BATCH_PIXELS``), which isolates the cost of
decoding and preprocessing. The three are timed in turn, ``--repeats`` times each; the
figures are medians. The target is served / bare >= 0.9 for efficientnet_b4 at 224 x 224. Also
the median latency of a one-image request through the pyfunc. Weights are random (``pretrained
none``): speed does not depend on them. The model is logged to a throwaway MLflow store.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import mlflow
import pandas as pd
import torch

from leukemia import images, synthetic
from leukemia.data import CLASSES
from leukemia.datasets import build_transform
from leukemia.model import create_classifier
from leukemia.model_files import ModelSpec
from leukemia.segmentation import SegmentationParams, preprocess_image
from leukemia.serving import log_served_model


def load_rgbs(data_dir: Path, count: int) -> tuple[list, str]:
    """``count`` RGB images: real ones spread over the classes when ``data_dir`` exists."""
    files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in images.IMAGE_SUFFIXES)
    if files:
        step = max(1, len(files) // count)
        chosen = (files[::step] * count)[:count]
        return [images.read_image(p) for p in chosen], f"{len(chosen)} real images ({data_dir})"
    rgbs = [synthetic.make_image(0, CLASSES[i % 4], i)[0] for i in range(count)]
    return rgbs, f"{count} synthetic images ({data_dir} not found)"


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_b4")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=Path("..", "shared", "data", "all"))
    args = parser.parse_args()

    rgbs, source = load_rgbs(args.data_dir, args.batch)
    # What a client sends: PNG files (lossless, so both sides see the same pixels), base64.
    pngs = [cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes() for rgb in rgbs]
    request = pd.DataFrame({"image": [base64.b64encode(png).decode("ascii") for png in pngs]})

    seg = SegmentationParams(image_size=args.image_size)
    classifier = create_classifier(args.model, pretrained="none").eval()
    cfg = classifier.backbone.pretrained_cfg
    mean, std = cfg["mean"], cfg["std"]
    transform = build_transform(False, mean, std)
    # The bare model's input, made as the training Dataset makes it (H x W x 3 -> C x H x W).
    preprocessed = [preprocess_image(images.decode_image(png), seg) for png in pngs]
    tensor = torch.stack([transform(torch.from_numpy(p).permute(2, 0, 1)) for p in preprocessed])

    with tempfile.TemporaryDirectory(prefix="leukemia-serve-bench-") as scratch:
        mlflow.set_tracking_uri(f"sqlite:///{Path(scratch, 'mlflow.db')}")
        mlflow.set_experiment(
            experiment_id=mlflow.create_experiment("serve-speed", Path(scratch).as_uri())
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's advice on model logging
            spec = ModelSpec.for_classifier(
                classifier,
                model_name=args.model,
                dropout=0.4,
                mean=mean,
                std=std,
                segmentation=seg,
            )
            model_info = log_served_model(classifier, spec)
        served = mlflow.pyfunc.load_model(model_info.model_uri)

        chunk = served.get_raw_model().batch_size

        def bare():
            with torch.inference_mode():
                classifier(tensor)

        def bare_in_chunks():  # what the served model does after preprocessing
            with torch.inference_mode():
                for start in range(0, len(tensor), chunk):
                    classifier(tensor[start : start + chunk])

        def served_batch():
            served.predict(request)

        single = request.iloc[:1]
        bare(), served_batch(), served.predict(single)  # warm-up (allocator, lazy imports)
        served_times, bare_times, chunked_times = [], [], []
        for _ in range(args.repeats):  # interleaved, so that drift hits all alike
            served_times.append(seconds(served_batch))
            bare_times.append(seconds(bare))
            chunked_times.append(seconds(bare_in_chunks))
        latencies = [seconds(lambda: served.predict(single)) for _ in range(args.repeats)]

    served_rate = args.batch / statistics.median(served_times)
    bare_rate = args.batch / statistics.median(bare_times)
    chunked_rate = args.batch / statistics.median(chunked_times)
    print(
        f"model {args.model} at {args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{source}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    )
    print(f"served pyfunc (base64 PNG in): {served_rate:8.1f} images/s")
    print(f"bare model (tensor in):        {bare_rate:8.1f} images/s")
    print(f"ratio served / bare:           {served_rate / bare_rate:8.3f} (target >= 0.9)")
    print(
        f"bare model in the served model's chunks of {chunk}: {chunked_rate:.1f} images/s; "
        f"served / that {served_rate / chunked_rate:.3f} (the cost of decoding and preprocessing)"
    )
    print(f"single-image latency (median): {statistics.median(latencies) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
