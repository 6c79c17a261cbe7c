"""`astraea bench`'s figures against values worked out here, not read back from its report:
each policy's mean JCT from the simulated jobs' own finish and arrival times, and the ratio
columns (xFCFS, bound, excess) from those means."""

from __future__ import annotations

import json
from statistics import fmean

import pytest

from astraea.profile import load_profile
from astraea.tools.cli.main import main
from astraea.tools.sim.metrics import idle_jct_s
from astraea.tools.sim.simulator import Simulation
from astraea.workloads import generate_mix

PROFILE = "gptj-6b-a100"
# Loaded enough that the KV cache fills and every KV action is taken.
JOBS, QPS, SEEDS = 200, 10.0, (0, 1)
POLICIES = ("vllm-fcfs", "astraea")


def by_hand(policy: str) -> tuple[float, float]:
    """(mean JCT, mean idle-engine JCT) over the seeds, each seed weighted alike (as the
    report averages its runs), from every job's finish minus arrival."""
    profile = load_profile(PROFILE)
    means, idles = [], []
    for seed in SEEDS:
        jobs = generate_mix(JOBS, seed, qps=QPS, context_window=profile.context_window)
        records = Simulation(list(jobs), profile, policy).run().records
        assert len(records) == JOBS
        means.append(fmean(r.finish_s - r.arrival_s for r in records))
        idles.append(fmean(idle_jct_s(j, profile) for j in jobs))
    return fmean(means), fmean(idles)


def test_bench_mean_jct_and_its_ratios_match_the_jobs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--jobs", str(JOBS), "--qps", f"{QPS:g}", "--seeds", "0-1",
                 "--policies", ",".join(POLICIES), "--parallel", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
    hand = {p: by_hand(p) for p in POLICIES}
    fcfs_mean, fcfs_idle = hand["vllm-fcfs"]
    for policy, (mean, idle) in hand.items():
        row = rows[policy]
        assert row["mean_jct_s"] == pytest.approx(mean, rel=1e-9)
        assert row["mean_idle_jct_s"] == pytest.approx(idle, rel=1e-9)
        expected = {"mean_jct_ratio_vs_vllm-fcfs": mean / fcfs_mean,
                    "mean_jct_bound_vs_vllm-fcfs": idle / fcfs_mean,
                    "excess_jct_ratio_vs_vllm-fcfs": (mean - idle) / (fcfs_mean - fcfs_idle)}
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-9), key
        # The table prints them last: xFCFS, bound, excess.
        (line,) = [x for x in printed.splitlines()
                   if x.split()[:1] == [policy] and x.split()[1].replace(".", "").isdigit()]
        assert line.split()[-3:] == [f"{v:.3f}" for v in expected.values()], line
    # Astraea is not simply vllm-fcfs here: its ratio differs from 1 at the table's precision.
    assert hand["astraea"][0] / fcfs_mean < 0.995
