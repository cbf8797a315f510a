"""stats.py: one bootstrap interval and one way to show a value with its interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsight.stats import (
    UNDEFINED,
    bootstrap_ci,
    format_ci,
    format_number,
    format_value_ci,
    interval,
)


def test_interval_is_the_central_percentile_range_ignoring_non_finite_values():
    values = np.array([*range(101), np.nan, np.inf], dtype=float)
    assert interval(values) == pytest.approx([2.5, 97.5])
    assert interval(values, confidence=0.5) == pytest.approx([25.0, 75.0])
    assert interval(None) is None
    assert interval(np.array([np.nan])) is None


def test_bootstrap_ci_is_seeded_brackets_the_mean_and_drops_missing_values():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, None, float("nan")]
    a, b = bootstrap_ci(values, seed=3), bootstrap_ci(values, seed=3)
    assert a == b and a["value"] == pytest.approx(0.6)
    assert a["ci"][0] <= 0.6 <= a["ci"][1]
    assert bootstrap_ci([0.5]) == {"value": 0.5, "ci": None}
    assert bootstrap_ci([1.0, 2.0], n_bootstrap=0) == {"value": 1.5, "ci": None}
    assert bootstrap_ci([]) == {"value": None, "ci": None}


@pytest.mark.parametrize(
    ("value", "digits", "shown"),
    [
        (0.91234, 3, "0.912"),
        (1.0, 3, "1.000"),
        (0.0, 3, "0.000"),
        (0.00004, 3, "4.0e-05"),
        (0.98765, 4, "0.9877"),
        (None, 3, UNDEFINED),
        (math.nan, 3, UNDEFINED),
        (math.inf, 3, UNDEFINED),
    ],
)
def test_format_number(value, digits, shown):
    assert format_number(value, digits) == shown


def test_format_value_ci_shows_the_interval_only_when_there_is_one():
    assert format_value_ci({"value": 0.9123, "ci": [0.88, 0.94]}) == "0.912 (0.880–0.940)"
    assert format_value_ci({"value": 0.9123, "ci": None}) == "0.912"
    assert format_value_ci({"value": 0.9123, "ci": [None, 0.94]}) == "0.912"
    assert format_value_ci({"value": None, "ci": [0.1, 0.2]}) == UNDEFINED
    assert format_value_ci(0.5) == "0.500"
    assert format_ci([0.1, 0.25], digits=2) == "0.10–0.25"
    assert format_ci(None) is None
    assert format_ci([-0.31, -0.21], digits=2) == "-0.31 to -0.21"  # not "-0.31–-0.21"
    assert format_ci([-0.05, 0.12], digits=2) == "-0.05 to 0.12"
