"""Online estimators: API latency windows (mean, quantiles, expected remaining) and outputs."""

from __future__ import annotations

import numpy as np
import pytest

from astraea.estimators import (
    PRIOR_API_S,
    PRIOR_OUTPUT_TOKENS,
    DurationWindow,
    OnlineEstimator,
)
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job


def waiting_job(category: str | None, api_start: float = 0.0, segment_index: int = 1,
                job_category: str = "qa") -> Job:
    j = Job("j", arrival_s=0.0, category=job_category)
    j.mark_ready(0.0, 10)
    j.mark_running(0.0, 0)
    j.mark_segment_end(api_start, 5, calls_tool=True)
    j.next_tool_category = category
    j.segment_index = segment_index
    return j


def ready_job(category="qa", segment_index=0) -> Job:
    j = Job("r", arrival_s=0.0, category=category)
    j.mark_ready(0.0, 10)
    j.segment_index = segment_index
    return j


# --- DurationWindow -------------------------------------------------------------------------
def test_window_keeps_the_last_observations_only():
    w = DurationWindow(size=3)
    for x in (10.0, 1.0, 2.0, 3.0):
        w.add(x)
    assert len(w) == 3 and w.count == 4
    assert w.mean == pytest.approx(2.0)
    assert w.sorted_samples == [1.0, 2.0, 3.0]


def test_window_quantiles():
    w = DurationWindow()
    for x in range(1, 101):
        w.add(float(x))
    assert w.quantile(0.0) == 1.0
    assert 50.0 <= w.quantile(0.5) <= 51.0  # an order statistic next to the median
    assert 90.0 <= w.quantile(0.9) <= 91.0
    assert w.quantile(0.99) == 100.0
    assert w.quantile(1.0) == 100.0


def test_expected_remaining_is_the_mean_residual_of_longer_calls():
    w = DurationWindow()
    for x in (1.0, 2.0, 3.0, 10.0):
        w.add(x)
    assert w.expected_remaining(0.0) == pytest.approx(4.0)
    assert w.expected_remaining(2.5) == pytest.approx((3 + 10) / 2 - 2.5)
    assert w.expected_remaining(3.0) == pytest.approx(7.0)
    assert w.expected_remaining(10.0) == 0.0  # every sample was shorter: assume it ends now


@pytest.mark.parametrize("n, size", [(50, 512), (300, 512), (900, 256)])
def test_expected_remaining_matches_brute_force_with_eviction(n, size):
    rng = np.random.default_rng(n)
    xs = rng.lognormal(0.0, 1.0, n)
    w = DurationWindow(size=size)
    for x in xs:
        w.add(float(x))
    window = xs[-size:]
    for elapsed in (0.0, 0.5, 1.0, 2.0, 5.0):
        longer = window[window > elapsed]
        expect = (longer.mean() - elapsed) if len(longer) else 0.0
        assert w.expected_remaining(elapsed) == pytest.approx(expect, rel=1e-9, abs=1e-9)
    assert w.mean == pytest.approx(window.mean())


# --- API latency ----------------------------------------------------------------------------
def test_prior_is_used_before_any_observation():
    est = OnlineJobEstimator()
    j = waiting_job("qa", api_start=10.0)
    assert est.api_duration_s(j) == PRIOR_API_S
    assert est.remaining_api_s(j, 10.25) == pytest.approx(PRIOR_API_S - 0.25)
    assert est.remaining_api_s(j, 10.0 + 5 * PRIOR_API_S) == 0.0
    assert est.api_duration_samples("qa") == []


def test_remaining_is_zero_when_not_waiting_for_an_api():
    est = OnlineJobEstimator()
    est.observe_api("qa", 5.0)
    assert est.remaining_api_s(ready_job(), 1.0) == 0.0


def test_category_with_few_observations_borrows_the_pooled_window():
    est = OnlineJobEstimator()
    for _ in range(10):
        est.observe_api("slow", 10.0)
    for _ in range(3):
        est.observe_api("fast", 0.1)
    fast = waiting_job("fast")
    assert est.api_duration_s(fast) == pytest.approx((10 * 10.0 + 3 * 0.1) / 13)
    for _ in range(5):  # now 8 observations of its own
        est.observe_api("fast", 0.1)
    assert est.api_duration_s(fast) == pytest.approx(0.1)
    assert est.api_duration_s(waiting_job("slow")) == pytest.approx(10.0)
    unseen = waiting_job("never-seen")
    assert est.api_duration_s(unseen) == pytest.approx((100 + 0.8) / 18)


def test_remaining_time_conditions_on_the_time_already_waited():
    est = OnlineJobEstimator()
    for d in [1.0] * 8 + [20.0] * 2:  # heavy tail
        est.observe_api("tool", d)
    j = waiting_job("tool", api_start=0.0)
    assert est.remaining_api_s(j, 0.0) == pytest.approx(np.mean([1.0] * 8 + [20.0] * 2))
    # After 2 s only the long calls are still possible: 20 − 2 = 18 s remain.
    assert est.remaining_api_s(j, 2.0) == pytest.approx(18.0)


def test_negative_api_duration_is_rejected():
    with pytest.raises(ValueError, match="negative"):
        OnlineEstimator().observe_api("qa", -1.0)


def test_quantile_and_samples_come_from_the_categorys_window():
    est = OnlineJobEstimator()
    for x in range(1, 21):
        est.observe_api("img", float(x))
    assert 10.0 <= est.api_quantile("img", 0.5) <= 11.0
    assert est.api_duration_samples("img") == [float(x) for x in range(1, 21)]
    assert OnlineEstimator().api_quantile("img", 0.5) == PRIOR_API_S


# --- output tokens --------------------------------------------------------------------------
def test_output_prediction_falls_back_from_segment_kind_to_category_to_all():
    est = OnlineJobEstimator()
    first_qa = ready_job("qa", segment_index=0)
    later_qa = ready_job("qa", segment_index=2)
    assert est.output_tokens(first_qa) == PRIOR_OUTPUT_TOKENS
    for _ in range(4):
        est.observe_output(ready_job("math", 0), 10)  # other category
    assert est.output_tokens(first_qa) == pytest.approx(10.0)  # all jobs
    for _ in range(4):
        est.observe_output(ready_job("qa", 1), 100)  # later segments of qa
    # qa first segments: none yet → the category's mean (100); later: their own mean.
    assert est.output_tokens(first_qa) == pytest.approx(100.0)
    assert est.output_tokens(later_qa) == pytest.approx(100.0)
    for _ in range(4):
        est.observe_output(ready_job("qa", 0), 20)
    assert est.output_tokens(first_qa) == pytest.approx(20.0)
    assert est.output_tokens(later_qa) == pytest.approx(100.0)
    assert est.output_tokens(ready_job("math", 3)) == pytest.approx(10.0)
