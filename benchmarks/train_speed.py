"""Training throughput through the real data loader vs the model alone (prints figures; not a test).

    python benchmarks/train_speed.py [--model efficientnet_b4] [--batch-size 8] [--steps 10]

The requirement: in each training phase (1: backbone frozen; 2: its last ``--unfreeze-last``
Keras layers trainable) images/s through the training loader (``ManifestDataset`` over a
preprocessed folder yielding uint8 images, a ``DataLoader`` with ``--num-workers`` workers,
pinned memory on CUDA, then ``BatchTransform``'s augmentation on the device, as training does)
reach >= 90% of the model's own step throughput on random tensors of the same shape and batch
size, measured in the same run.

Both measurements time the same step, the one ``engine.train_one_epoch`` runs (zero_grad,
autocast forward, float loss, backward, optimizer step, ``.item()`` syncs); the loader arm also
moves each batch to the device inside the timed loop, as training does. Also printed, for
reference: inference images/s (``engine.evaluate``'s forward under ``inference_mode``) and the
step throughput with the whole network trainable in fp32 and in bf16 autocast.

Phase 1 as training runs it (``engine.train_head_epoch``: the frozen backbone on chunks of
``--chunk`` images, default ``train.chunk_images``, then the head's steps per batch), fed by
the same loader, as a ratio of the network's best inference images/s over the batch sizes
``--inference-batches`` (default up to 64 on a CPU, 512 on CUDA), measured in the same run:
target >= 0.8.

``--data`` is a ``leukemia preprocess`` output folder. Without it the real images in
``../shared/data/all`` (or, when absent, synthetic ones) are preprocessed into a temporary folder
first; that preprocessing is outside every timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from leukemia import engine, synthetic
from leukemia import model as m
from leukemia.config import PRECISIONS, TrainConfig
from leukemia.data import CLASSES
from leukemia.datasets import BatchTransform, ManifestDataset, class_weights
from leukemia.preprocess import preprocess
from leukemia.segmentation import SegmentationParams
from leukemia.train import (
    build_classifier,
    chunk_images,
    loader_options,
    normalisation,
    phases,
    resolve_device,
    set_trainable,
)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "all"
TARGET_RATIO = 0.90
HEAD_TARGET_RATIO = 0.80  # phase 1 (fast path) / best inference
INFERENCE_BATCHES = {"cpu": "8,16,32,64", "cuda": "8,32,64,128,256,512"}
TRAIN_FRACTION = 0.7  # preprocess' default split: the train split holds ~70% of the images


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_b4")
    parser.add_argument("--image-size", type=_positive_int, default=224)
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--unfreeze-last", type=_non_negative_int, default=60)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=None,
        help="loader worker processes; default min(8, cores) on CUDA, 0 on a CPU",
    )
    parser.add_argument("--steps", type=_positive_int, default=10, help="timed steps per figure")
    parser.add_argument("--warmup", type=_non_negative_int, default=2)
    parser.add_argument("--data", default=None, help="a preprocess output folder")
    parser.add_argument("--segment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--chunk", type=_positive_int, default=None, help="phase-1 images per backbone pass"
    )
    parser.add_argument(
        "--inference-batches", default=None, help="comma-separated batch sizes for inference"
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="interleaved repeats of the phase-1 and inference figures (best of each)",
    )
    parser.add_argument(
        "--in-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode the split once into memory, as training does (--no-in-memory: a PNG "
        "decoded per item, as before; run both to compare)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args()


def default_num_workers(device: torch.device) -> int:
    # On CUDA the GPU steps while worker processes decode on otherwise idle cores.
    # On a CPU the training step already uses every core (intra-op threads), so workers would
    # only compete with it for the same cores; loading in-process (0) is the fair setting, and
    # decoding a small PNG costs little next to a CPU training step.
    if device.type == "cuda":
        return min(8, os.cpu_count() or 1)  # workers now only decode PNGs
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"{processor} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def prepare_data(args: argparse.Namespace, scratch: str) -> tuple[Path, str]:
    """A preprocessed folder to read, and a line that says where it came from."""
    if args.data is not None:
        return Path(args.data), f"{args.data} (given)"
    seg = SegmentationParams(image_size=args.image_size, segment=args.segment)
    if REAL_DATA.is_dir():
        source, what = REAL_DATA, f"{REAL_DATA} (real)"
    else:
        # Enough training images that the warm-up (at least the 16 batches 8 workers queue
        # ahead) and the timed batches never exhaust the split, only roughly 70% of the images.
        needed = (max(args.warmup, 16) + args.steps) * args.batch_size
        per_class = math.ceil(needed / (TRAIN_FRACTION * len(CLASSES)) * 1.2) + 2
        size = max(args.image_size, 32)
        source = synthetic.generate(Path(scratch) / "synthetic", per_class=per_class, size=size)
        what = f"synthetic, {per_class} per class"
    start = time.perf_counter()
    result = preprocess(source, Path(scratch) / "processed", seg=seg, progress=False)
    seconds = time.perf_counter() - start
    images = result.counts.get("images", "?")
    return result.out_dir, f"{what}; {images} images preprocessed in {seconds:.1f} s, untimed"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, images, labels, loss_fn, optimizer, precision, scaler) -> int:
    """``engine.train_step``, the step training runs (with its two host syncs); returns the
    batch size."""
    engine.train_step(model, images, labels, loss_fn, optimizer, precision, scaler)
    return len(labels)


def random_batch(shape, batch_size: int, device, precision: engine.Precision):
    memory = torch.channels_last if precision.channels_last else torch.preserve_format
    images = torch.randn(batch_size, *shape, device=device).contiguous(memory_format=memory)
    return images, torch.randint(len(CLASSES), (batch_size,), device=device)


def random_rate(model, batch, loss_fn, config, precision, steps, warmup, device) -> float:
    """Images/s of the train step on one pre-made on-device batch."""
    optimizer = make_optimizer(model, config)
    scaler = precision.scaler()
    m.set_train_mode(model, config.freeze_bn_stats)
    for _ in range(warmup):
        train_step(model, *batch, loss_fn, optimizer, precision, scaler)
    _sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += train_step(model, *batch, loss_fn, optimizer, precision, scaler)
    _sync(device)
    return seen / (time.perf_counter() - start)


def endless(loader):
    # persistent_workers keeps the workers alive when the dataset is exhausted and iteration
    # starts over, so a restart costs a refill of the queue, not new processes.
    while True:
        yield from loader


def loader_rate(model, loader, augment, loss_fn, config, precision, steps, warmup, device) -> float:
    """Images/s of the same train step fed by ``loader``, moving each batch in the timed loop."""
    optimizer = make_optimizer(model, config)
    scaler = precision.scaler()
    m.set_train_mode(model, config.freeze_bn_stats)
    batches = endless(loader)  # workers start here, before the timer
    # Warm up with at least as many batches as the workers queue ahead (prefetch_factor each):
    # the batches they finish while starting up would otherwise flatter a slow loader.
    queued = loader.num_workers * (loader.prefetch_factor or 0)
    for _ in range(max(warmup, queued)):
        images, labels = engine._to_device(*next(batches), device, precision, augment)
        train_step(model, images, labels, loss_fn, optimizer, precision, scaler)
    _sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        images, labels = engine._to_device(*next(batches), device, precision, augment)
        seen += train_step(model, images, labels, loss_fn, optimizer, precision, scaler)
    _sync(device)
    return seen / (time.perf_counter() - start)


@torch.inference_mode()
def inference_rate(model, images, precision, steps, warmup, device) -> float:
    """Images/s of ``engine.evaluate``'s forward (softmax probabilities copied to the host)."""
    model.eval()

    def forward():
        with precision.autocast():
            logits = model(images)
        logits.float().softmax(1).cpu()

    for _ in range(warmup):
        forward()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        forward()
    _sync(device)
    return steps * len(images) / (time.perf_counter() - start)


def head_epoch_rate(
    model, loader, augment, loss_fn, config, precision, chunk, steps, warmup, device
):
    """Images/s of phase 1 as ``train`` runs it, ``engine.train_head_epoch`` over ``steps``
    chunks of the loader's batches (after ``warmup`` chunks)."""
    set_trainable(model, phases(config)[0])
    optimizer = make_optimizer(model, config)
    batches = endless(loader)
    per_chunk = max(1, chunk // config.batch_size)

    def run(chunks: int) -> dict:
        return engine.train_head_epoch(
            model,
            itertools.islice(batches, chunks * per_chunk),
            loss_fn,
            optimizer,
            device,
            precision,
            batch_transform=augment,
            chunk_batches=per_chunk,
        )

    run(max(warmup, 1))  # train_head_epoch ends on a host sync (the last loss's .item())
    return run(steps)["images_per_second"]


def best_inference(model, shape, precision, sizes, steps, warmup, device) -> dict:
    """Inference images/s per batch size (about the same number of images timed for each)."""
    rates = {}
    for size in sizes:
        images = random_batch(shape, size, device, precision)[0]
        size_steps = max(2, steps * 8 // size)
        rates[size] = inference_rate(model, images, precision, size_steps, warmup, device)
    return rates


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    # As train.make_optimizer (one rate: the rate does not change the speed).
    return torch.optim.AdamW(
        m.trainable_parameters(model), lr=config.phase1_lr, weight_decay=config.weight_decay
    )


def load_setup(args: argparse.Namespace):
    """The validated config, its device and precision; a bad option raises ValueError."""
    config = TrainConfig(
        model=args.model,
        pretrained="none",  # the weights' values do not change the speed
        batch_size=args.batch_size,
        unfreeze_last=args.unfreeze_last,
        precision=args.precision,
        device=args.device,
        num_workers=args.num_workers or 0,
    )
    device = resolve_device(config.device)
    if args.num_workers is None:
        config = dataclasses.replace(config, num_workers=default_num_workers(device))
    return config, device, engine.resolve_precision(config.precision, device)


def main() -> None:
    args = parse_args()
    try:
        config, device, precision = load_setup(args)
        classifier = build_classifier(config, args.image_size).to(device)
    except ValueError as error:
        raise SystemExit(f"{Path(__file__).name}: error: {error}") from None
    if precision.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    mean, std = normalisation(classifier)

    with tempfile.TemporaryDirectory(prefix="leukemia-train-speed-") as scratch:
        try:
            data_dir, data_note = prepare_data(args, scratch)
            train_set = ManifestDataset(data_dir, "train", in_memory=args.in_memory)
        except ValueError as error:  # DatasetError included: a bad --data folder
            raise SystemExit(f"{Path(__file__).name}: error: {error}") from None
        loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(train_set.labels).to(device))
        loader = DataLoader(
            train_set,
            shuffle=True,
            # Every timed batch the size of the random one; train() keeps the last partial
            # batch, which only matters at an epoch's end.
            drop_last=True,
            **loader_options(config, device),
        )
        augment = BatchTransform(
            mean,
            std,
            augment=True,
            generator=torch.Generator().manual_seed(0),
            colour=config.colour_jitter,
            exposure=config.exposure_jitter,
        ).to(device)
        shape = tuple(train_set[0][0].shape)  # from the folder, which --data may size
        batch = random_batch(shape, config.batch_size, device, precision)
        timing = {"steps": args.steps, "warmup": args.warmup, "device": device}

        rows = []
        for phase in phases(config):
            set_trainable(classifier, phase)
            model_only = random_rate(classifier, batch, loss_fn, config, precision, **timing)
            loaded = loader_rate(classifier, loader, augment, loss_fn, config, precision, **timing)
            rows.append(
                {
                    "phase": phase.name,
                    "unfreeze_last": phase.unfreeze_last,
                    "precision": precision.name,
                    "trainable_params": m.count_trainable(classifier),
                    "random_images_per_second": model_only,
                    "loader_images_per_second": loaded,
                    "ratio": loaded / model_only,
                }
            )
        inference = inference_rate(classifier, batch[0], precision, **timing)
        chunk = args.chunk or chunk_images(device)
        sizes = [
            int(s) for s in (args.inference_batches or INFERENCE_BATCHES[device.type]).split(",")
        ]
        # Interleaved repeats, best of each: a shared machine's speed drifts over minutes, and
        # one figure measured after the other would carry the drift into their ratio.
        head_rate, inference_by_batch = 0.0, dict.fromkeys(sizes, 0.0)
        for _ in range(args.repeats):
            rates = best_inference(classifier, shape, precision, sizes, **timing)
            inference_by_batch = {s: max(inference_by_batch[s], rates[s]) for s in sizes}
            head_rate = max(
                head_rate,
                head_epoch_rate(
                    classifier, loader, augment, loss_fn, config, precision, chunk, **timing
                ),
            )

        classifier.requires_grad_(True)
        whole = {}
        for name in ("fp32", "bf16"):
            if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                whole[name] = None
                continue
            reference = engine.Precision(name, device.type)
            reference_batch = random_batch(shape, config.batch_size, device, reference)
            whole[name] = random_rate(
                classifier, reference_batch, loss_fn, config, reference, **timing
            )

    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "model": config.model,
        "image_shape": list(shape),
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "in_memory": train_set.decoded is not None,
        "steps": args.steps,
        "warmup": args.warmup,
        "data": data_note,
        "target_ratio": TARGET_RATIO,
        "phases": rows,
        "inference_images_per_second": inference,
        "inference_precision": precision.name,
        "phase1_fast": {
            "chunk_images": chunk,
            "images_per_second": head_rate,
            "inference_images_per_second_by_batch": inference_by_batch,
            "ratio": head_rate / max(inference_by_batch.values()),
            "target_ratio": HEAD_TARGET_RATIO,
        },
        "whole_network_images_per_second": whole,
    }
    print_report(report)
    if args.json:
        print(json.dumps(report, indent=2))


def print_report(report: dict) -> None:
    print(
        f"device: {report['device']}; torch {report['torch']}, timm {report['timm']}\n"
        f"model: {report['model']}, input {'x'.join(map(str, report['image_shape']))}, "
        f"batch {report['batch_size']}, loader workers {report['num_workers']}, images "
        f"{'decoded once into memory' if report['in_memory'] else 'decoded per item'}, "
        f"{report['steps']} timed steps after {report['warmup']} warm-up\n"
        f"data: {report['data']}\n"
    )
    header = ("phase", "precision", "trainable", "random img/s", "loader img/s", "ratio", "ok")
    print("{:<8} {:<9} {:>11} {:>13} {:>13} {:>6}  {}".format(*header))
    for row in report["phases"]:
        ok = "yes" if row["ratio"] >= report["target_ratio"] else "NO"
        print(
            f"{row['phase']:<8} {row['precision']:<9} {row['trainable_params']:>11,} "
            f"{row['random_images_per_second']:>13.1f} {row['loader_images_per_second']:>13.1f} "
            f"{row['ratio']:>6.2f}  {ok}"
        )
    print(f"(target: loader / random >= {report['target_ratio']:.2f} in every phase)\n")
    print(
        f"inference ({report['inference_precision']}, inference_mode): "
        f"{report['inference_images_per_second']:.1f} images/s"
    )
    fast = report["phase1_fast"]
    best = max(fast["inference_images_per_second_by_batch"].items(), key=lambda kv: kv[1])
    by_batch = ", ".join(
        f"{size}: {rate:.1f}" for size, rate in fast["inference_images_per_second_by_batch"].items()
    )
    ok = "yes" if fast["ratio"] >= fast["target_ratio"] else "NO"
    print(
        f"inference images/s by batch size: {by_batch}\n"
        f"phase 1 as trained (backbone on chunks of {fast['chunk_images']} images, head steps "
        f"per batch of {report['batch_size']}, real loader): {fast['images_per_second']:.1f} "
        f"images/s = {fast['ratio']:.2f} x the best inference ({best[1]:.1f} at batch "
        f"{best[0]}); target >= {fast['target_ratio']:.2f}: {ok}"
    )
    for name, rate in report["whole_network_images_per_second"].items():
        shown = "n/a (unsupported)" if rate is None else f"{rate:.1f} images/s"
        print(f"whole network trainable, {name}, random tensors: {shown}")


if __name__ == "__main__":
    main()
