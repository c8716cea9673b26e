"""benchmarks/quality/lds_fair.py: the tuning protocol never looks at the half it reports."""

from __future__ import annotations

import numpy as np

from benchmarks.quality import lds_fair
from benchmarks.quality.lds_fair import Candidate


def test_validation_and_report_halves_partition_the_test_examples():
    validation, report = lds_fair.split(201)
    assert len(np.intersect1d(validation, report)) == 0
    assert sorted(np.concatenate([validation, report]).tolist()) == list(range(201))


def test_each_family_is_chosen_on_the_validation_half_only():
    validation, report = lds_fair.split(10)
    good_on_validation, good_on_report = np.zeros(10), np.zeros(10)
    good_on_validation[validation], good_on_report[report] = 0.5, 0.9
    candidates = [Candidate("distinf gauss_newton", "a", good_on_validation),
                  Candidate("distinf gauss_newton", "b", good_on_report)]
    assert lds_fair.choose(candidates, validation)["distinf gauss_newton"].setting == "a"
    lines, diffs = lds_fair.seed_table(candidates, validation, report)
    assert "| distinf gauss_newton | a | best on validation | 0.000 ± 0.000 | 0.500 |" in lines[2]
    assert np.all(diffs["distinf gauss_newton (tuned)"][1] == 0)


def test_the_distinf_damping_multiple_is_restored_after_each_call():
    import distinf.core.curvature as curvature

    with lds_fair.auto_damping_scale(0.01):
        assert curvature.damping_from_trace(10.0, 1, 10, "auto") == 0.01 * 1.0
    assert curvature.AUTO_DAMPING_SCALE == 0.1
