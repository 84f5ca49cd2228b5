"""Throughput of ``leukemia preprocess`` on a real dataset (prints figures; not a test).

    python benchmarks/preprocess_speed.py [--data-dir ../shared/data/all] [--repeats 5]

Each repeat preprocesses every image into a fresh output folder (nothing cached), timing the
whole ``preprocess()`` call: listing, decoding, segmentation, PNG writing, audit, split,
manifest and preview. MLflow logging and interpreter start-up are outside the timing. The
target is >= 1,500 images/s for the segmented arm on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from leukemia.preprocess import default_workers, preprocess
from leukemia.segmentation import SegmentationParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "all"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="0 = every core")
    args = parser.parse_args()
    print(
        f"data: {args.data_dir}; workers: {args.workers or default_workers()}; "
        f"cores: {os.cpu_count()}"
    )
    with tempfile.TemporaryDirectory(prefix="leukemia-bench-") as scratch:
        for arm, seg in (
            ("segmented", SegmentationParams()),
            ("baseline (--no-segment)", SegmentationParams(segment=False)),
        ):
            rates = []
            for repeat in range(args.repeats):
                out = os.path.join(scratch, f"{seg.segment}-{repeat}")
                start = time.perf_counter()
                result = preprocess(
                    args.data_dir, out, seg=seg, workers=args.workers, progress=False
                )
                seconds = time.perf_counter() - start
                rates.append(result.counts["images"] / seconds)
            start = time.perf_counter()
            cached = preprocess(args.data_dir, out, seg=seg, workers=args.workers, progress=False)
            cached_ms = (time.perf_counter() - start) * 1e3
            assert cached.cache_hit
            print(
                f"{arm}: {result.counts['images']} images; images/s median "
                f"{statistics.median(rates):.0f}, best {max(rates):.0f}, worst {min(rates):.0f} "
                f"over {args.repeats} runs; cached re-run {cached_ms:.0f} ms"
            )


if __name__ == "__main__":
    main()
