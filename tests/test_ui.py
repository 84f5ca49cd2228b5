"""The study's one-line verdict, from hand-made statistics (known answers)."""

from __future__ import annotations

import pytest

from leukemia import ui


def _tests(pair: str, low: float, high: float, difference: float, p_values=(0.035, 0.2)):
    return {
        "pooled": {pair: {"difference": difference, "low": low, "high": high}},
        "per_seed": {str(i): {pair: {"p_value": p}} for i, p in enumerate(p_values, 1)},
        "best_shortcut": "shortcut-rgb",
    }


@pytest.mark.parametrize(
    "pair, low, high, reading",
    [
        ("proposed_vs_baseline", -0.062, -0.006, "segmentation did not help: it cost accuracy"),
        ("proposed_vs_baseline", 0.01, 0.05, "segmentation helped"),
        ("lab-a_vs_baseline", -0.02, 0.03, "no difference shown between lab-a and baseline"),
        ("baseline_vs_shortcut-rgb", -0.2, -0.1, "baseline did not help: it cost accuracy"),
    ],
)
def test_the_verdict_reads_the_pooled_interval(pair, low, high, reading):
    a, b = pair.split("_vs_")
    line = ui.verdict(_tests(pair, low, high, (low + high) / 2))
    points = f"{100 * (low + high) / 2:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]"
    assert line == f"**{a} − {b}: {points}, McNemar p 0.035, 0.2: {reading}.**"


def test_no_pair_no_verdict():
    tests = {"pooled": {}, "per_seed": {}, "best_shortcut": None}
    assert ui.verdict(tests) == "One deep arm and no shortcut arm: nothing to pair."
