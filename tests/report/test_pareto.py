"""The Pareto frontier of a compression comparison."""

from __future__ import annotations

from gradwise.report.pareto import pareto_front


def test_front_keeps_only_points_no_other_beats_on_both_axes():
    # (cost, quality): b dominates d (cheaper and better); e ties a on cost but is worse.
    points = [(1.0, 0.80), (2.0, 0.85), (4.0, 0.90), (3.0, 0.84), (1.0, 0.70), (5.0, 0.89)]
    assert pareto_front(points) == [0, 1, 2]


def test_front_for_a_metric_where_lower_is_better():
    points = [(1.0, 0.5), (2.0, 0.3), (3.0, 0.4), (4.0, 0.1)]
    assert pareto_front(points, higher_is_better=False) == [0, 1, 3]
