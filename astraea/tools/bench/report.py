"""Aggregate benchmark runs into rows, tables, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

AVERAGED = (
    "mean_jct_s", "p50_jct_s", "p90_jct_s", "p99_jct_s", "max_jct_s", "mean_slowdown",
    "mean_idle_jct_s",
    "normalized_latency_s_per_token", "mean_ttft_s", "throughput_jobs_per_s",
    "peak_kv_utilization", "sim_wall_s",
)
SUMMED = ("jobs", "jobs_completed", "kv_preserve", "kv_swap", "kv_discard", "preemptions",
          "tokens_recomputed", "tokens_swapped_out")


def _sigma(r: dict) -> float:
    # Runs and rows saved before `--prediction-error` existed had exact estimates.
    return r.get("prediction_error", 0.0)


def _label(qps: float | None, sigma: float, show_sigma: bool) -> str:
    label = "trace arrivals" if qps is None else f"QPS {qps:g}"
    return f"{label}, prediction error sigma {sigma:g}" if show_sigma else label


def _shows_sigma(rows: list[dict]) -> bool:
    return any(_sigma(r) != 0 for r in rows)


def aggregate(runs: list[dict], baseline: str = "vllm-fcfs") -> list[dict]:
    """One row per (policy, qps, prediction error σ): metrics averaged over seeds, counts
    summed, the ratio of mean and p99 JCT to the baseline policy's at the same QPS and σ, and
    (when some σ > 0) to the same policy's at σ = 0."""
    keys = []
    for r in runs:
        k = (r["policy"], r["qps"], _sigma(r))
        if k not in keys:
            keys.append(k)
    rows = []
    for policy, qps, sigma in keys:
        group = [r for r in runs
                 if r["policy"] == policy and r["qps"] == qps and _sigma(r) == sigma]
        row = {"policy": policy, "qps": qps, "prediction_error": sigma,
               "seeds": [r["seed"] for r in group]}
        for k in AVERAGED:
            vals = [r[k] for r in group if k in r]
            row[k] = float(np.mean(vals)) if vals else float("nan")
        for k in SUMMED:
            row[k] = int(sum(r.get(k, 0) for r in group))
        rows.append(row)
    for row in rows:
        base = next((b for b in rows if b["policy"] == baseline and b["qps"] == row["qps"]
                     and _sigma(b) == _sigma(row)), None)
        if base is not None:
            row["mean_jct_ratio_vs_" + baseline] = row["mean_jct_s"] / base["mean_jct_s"]
            row["p99_jct_ratio_vs_" + baseline] = row["p99_jct_s"] / base["p99_jct_s"]
            # The best any scheduler could do: every job at its idle-engine JCT.
            row["mean_jct_bound_vs_" + baseline] = row["mean_idle_jct_s"] / base["mean_jct_s"]
            excess = base["mean_jct_s"] - base["mean_idle_jct_s"]
            if excess > 0:
                row["excess_jct_ratio_vs_" + baseline] = (
                    row["mean_jct_s"] - row["mean_idle_jct_s"]) / excess
    if _shows_sigma(rows):
        for row in rows:
            exact = next((b for b in rows if b["policy"] == row["policy"]
                          and b["qps"] == row["qps"] and _sigma(b) == 0), None)
            if exact is not None:
                row["mean_jct_ratio_vs_sigma0"] = row["mean_jct_s"] / exact["mean_jct_s"]
                row["p99_jct_ratio_vs_sigma0"] = row["p99_jct_s"] / exact["p99_jct_s"]
    return rows


COLUMNS = (
    ("policy", "policy", "{:<14}"),
    ("mean_jct_s", "mean", "{:>8.2f}"),
    ("p50_jct_s", "p50", "{:>8.2f}"),
    ("p90_jct_s", "p90", "{:>8.2f}"),
    ("p99_jct_s", "p99", "{:>8.2f}"),
    ("max_jct_s", "max", "{:>8.2f}"),
    ("mean_slowdown", "slowdown", "{:>8.2f}"),
    ("normalized_latency_s_per_token", "s/token", "{:>8.4f}"),
    ("throughput_jobs_per_s", "jobs/s", "{:>7.3f}"),
    ("kv_preserve", "preserve", "{:>8d}"),
    ("kv_swap", "swap", "{:>7d}"),
    ("kv_discard", "discard", "{:>7d}"),
    ("peak_kv_utilization", "peakKV", "{:>6.2f}"),
    ("mean_jct_ratio_vs_vllm-fcfs", "xFCFS", "{:>6.3f}"),
    ("mean_jct_bound_vs_vllm-fcfs", "bound", "{:>6.3f}"),
    ("excess_jct_ratio_vs_vllm-fcfs", "excess", "{:>6.3f}"),
)


def format_tables(rows: list[dict]) -> str:
    out = []
    show_sigma = _shows_sigma(rows)
    for qps, sigma in dict.fromkeys((r["qps"], _sigma(r)) for r in rows):
        group = [r for r in rows if r["qps"] == qps and _sigma(r) == sigma]
        label = _label(qps, sigma, show_sigma)
        seeds = ",".join(str(s) for s in group[0]["seeds"])
        out.append(f"\n{label} (seeds {seeds}; JCT in seconds; xFCFS = mean JCT / vllm-fcfs's; "
                   "bound = idle-engine mean JCT / vllm-fcfs's, the best any scheduler can do; "
                   "excess = (mean JCT - idle) / vllm-fcfs's)")
        out.append(" ".join(f"{name:>{len(fmt.format(0) if 'd' in fmt or 'f' in fmt else name)}}"
                            if i else f"{name:<14}" for i, (_, name, fmt) in enumerate(COLUMNS)))
        for r in group:
            cells = []
            for key, name, fmt in COLUMNS:
                v = r.get(key)
                if v is None:
                    cells.append(f"{'-':>{len(name)}}")
                else:
                    cells.append(fmt.format(v))
            out.append(" ".join(cells))
    return "\n".join(out)


def format_degradation(rows: list[dict], policy: str = "astraea") -> str:
    """Per load, each policy's mean and p99 JCT at every prediction error σ side by side, with
    its ratio to its own σ = 0 result, and `policy`'s ratio to the best peer at each σ.
    Empty when every row has exact estimates."""
    if not _shows_sigma(rows):
        return ""
    sigmas = list(dict.fromkeys(_sigma(r) for r in rows))
    cell = 22
    out = ["\nPrediction error: mean and p99 JCT in seconds, (xR) = the same policy's value "
           "at sigma 0 times R; 'best peer' = the lowest among the other policies"]
    for qps in dict.fromkeys(r["qps"] for r in rows):
        at = {(r["policy"], _sigma(r)): r for r in rows if r["qps"] == qps}
        policies = list(dict.fromkeys(p for p, _ in at))
        out.append("")
        out.append(f"{_label(qps, 0, False):<18}" + " ".join(
            f"{'sigma ' + format(e, 'g'):>{2 * cell + 1}}" for e in sigmas))
        out.append(f"{'policy':<18}" + " ".join(f"{'mean':>{cell}} {'p99':>{cell}}"
                                                  for _ in sigmas))
        for p in policies:
            cells = []
            for e in sigmas:
                r = at.get((p, e))
                for key, ratio in (("mean_jct_s", "mean_jct_ratio_vs_sigma0"),
                                   ("p99_jct_s", "p99_jct_ratio_vs_sigma0")):
                    if r is None:
                        cells.append(f"{'-':>{cell}}")
                    elif ratio in r and e != 0:
                        cells.append(f"{f'{r[key]:.2f} (x{r[ratio]:.3f})':>{cell}}")
                    else:
                        cells.append(f"{r[key]:>{cell}.2f}")
            out.append(f"{p:<18}" + " ".join(cells))
        if policy not in policies:
            continue
        cells = []
        for e in sigmas:
            mine = at.get((policy, e))
            peers = [r for (p, s), r in at.items()
                     if s == e and p != policy and not p.startswith(policy)]
            for key in ("mean_jct_s", "p99_jct_s"):
                if mine is None or not peers:
                    cells.append(f"{'-':>{cell}}")
                    continue
                best = min(peers, key=lambda r: r[key])
                text = f"x{mine[key] / best[key]:.3f} {best['policy']}"
                cells.append(f"{text:>{cell}}")
        out.append(f"{policy + '/best peer':<18}" + " ".join(cells))
    return "\n".join(out)


def write_json(path: str | Path, spec: dict, rows: list[dict], runs: list[dict]) -> None:
    Path(path).write_text(json.dumps({"spec": spec, "rows": rows, "runs": runs}, indent=1))


def plot(path: str | Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    show_sigma = _shows_sigma(rows)
    for policy, sigma in dict.fromkeys((r["policy"], _sigma(r)) for r in rows):
        pts = sorted((r["qps"], r["mean_jct_s"], r["p99_jct_s"]) for r in rows
                     if r["policy"] == policy and _sigma(r) == sigma and r["qps"] is not None)
        if not pts:
            continue
        q, mean, p99 = zip(*pts)
        label = f"{policy} sigma {sigma:g}" if show_sigma else policy
        axes[0].plot(q, mean, marker="o", label=label)
        axes[1].plot(q, p99, marker="o", label=label)
    for ax, title in zip(axes, ("mean JCT", "p99 JCT")):
        ax.set_xlabel("QPS (jobs/s)")
        ax.set_ylabel(f"{title} (s)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replica_check(rows: list[dict], policy: str = "astraea", baseline: str = "vllm-fcfs",
                  band: tuple[float, float] = (1.5, 10.0), target: float = 0.70) -> list[str]:
    """The paper-replica criteria, QPS by QPS: where the baseline completes its jobs with a
    mean slowdown inside `band`, is `policy`'s mean JCT at most `target` × the baseline's
    (and what is the physical bound), no higher than any peer's, and its p99 no higher than
    the baseline's? Elsewhere, is it still no higher than any peer's?"""
    lines = []
    show_sigma = _shows_sigma(rows)
    for qps, sigma in dict.fromkeys((r["qps"], _sigma(r)) for r in rows):
        group = {r["policy"]: r for r in rows if r["qps"] == qps and _sigma(r) == sigma}
        if policy not in group or baseline not in group:
            continue
        mine, base = group[policy], group[baseline]
        peers = {p: r for p, r in group.items() if p != policy and not p.startswith(policy)}
        best_peer = min(peers.items(), key=lambda kv: kv[1]["mean_jct_s"]) if peers else None
        beats_peers = best_peer is None or mine["mean_jct_s"] <= best_peer[1]["mean_jct_s"]
        in_band = (band[0] <= base["mean_slowdown"] <= band[1]
                   and base["jobs_completed"] == base["jobs"])
        ratio = mine["mean_jct_s"] / base["mean_jct_s"]
        bound = mine["mean_idle_jct_s"] / base["mean_jct_s"]
        label = "trace" if qps is None else f"QPS {qps:g}"
        if show_sigma:
            label += f" sigma {sigma:g}"
        peer_txt = (f"best peer {best_peer[0]} {best_peer[1]['mean_jct_s']:.2f} s"
                    if best_peer else "no peer")
        verdict = "beats every peer" if beats_peers else "DOES NOT beat every peer"
        if in_band:
            ok_ratio = ratio <= target
            ok_p99 = mine["p99_jct_s"] <= base["p99_jct_s"]
            lines.append(
                f"{label}: {baseline} slowdown {base['mean_slowdown']:.2f} (in band) -> "
                f"{policy} mean JCT x{ratio:.3f} of {baseline} (target <= {target:.2f}: "
                f"{'met' if ok_ratio else 'NOT met'}; physical bound x{bound:.3f}); "
                f"p99 {'<=' if ok_p99 else '>'} {baseline}'s; {verdict} ({peer_txt})")
        else:
            lines.append(
                f"{label}: {baseline} slowdown {base['mean_slowdown']:.2f} (outside band) -> "
                f"{policy} x{ratio:.3f}; {verdict} ({peer_txt})")
    return lines


def goal_check(rows: list[dict], policy: str = "astraea", baseline: str = "vllm-fcfs",
               loaded: float = 1.3, cliff: float = 10.0, excess_target: float = 0.5) -> list[str]:
    """One line per load: `policy`'s mean JCT over the best peer's, its p99 over the lowest
    peer p99 and, past the cliff, its excess JCT (mean - idle) over the best peer's. The goal
    applies where the baseline's mean slowdown is at least `loaded`: mean <= the best peer's,
    p99 <= the lowest peer p99, and past the cliff (slowdown > `cliff`) excess <=
    `excess_target` x the best peer's. Each line says plainly which part is not met."""
    lines = []
    show_sigma = _shows_sigma(rows)
    for qps, sigma in dict.fromkeys((r["qps"], _sigma(r)) for r in rows):
        group = {r["policy"]: r for r in rows if r["qps"] == qps and _sigma(r) == sigma}
        peers = [r for p, r in group.items() if p != policy and not p.startswith(policy)]
        if policy not in group or not peers:
            continue
        mine = group[policy]
        label = ("trace" if qps is None else f"QPS {qps:g}") + (
            f" sigma {sigma:g}" if show_sigma else "")
        best = min(peers, key=lambda r: r["mean_jct_s"])
        low99 = min(peers, key=lambda r: r["p99_jct_s"])
        mean_ratio = mine["mean_jct_s"] / best["mean_jct_s"]
        p99_ratio = mine["p99_jct_s"] / low99["p99_jct_s"]
        parts = [f"mean x{mean_ratio:.3f} of best peer ({best['policy']} "
                 f"{best['mean_jct_s']:.1f} s)",
                 f"p99 x{p99_ratio:.3f} of lowest peer p99 ({low99['policy']} "
                 f"{low99['p99_jct_s']:.1f} s)"]
        base = group.get(baseline)
        slowdown = base["mean_slowdown"] if base else float("nan")
        missed = []
        past_cliff = slowdown > cliff
        if past_cliff:
            excess = mine["mean_jct_s"] - mine["mean_idle_jct_s"]
            best_excess = min(r["mean_jct_s"] - r["mean_idle_jct_s"] for r in peers)
            excess_ratio = excess / best_excess if best_excess > 0 else float("inf")
            parts.append(f"excess x{excess_ratio:.3f} of best peer's (target <= "
                         f"{excess_target:g})")
            if not excess_ratio <= excess_target:
                missed.append("excess")
        where = (f"{baseline} slowdown {slowdown:.2f}"
                 + (" (past the cliff)" if past_cliff else ""))
        if not slowdown >= loaded:
            verdict = f"light load (goal applies from slowdown {loaded:g})"
        else:
            if mean_ratio > 1:
                missed.insert(0, "mean")
            if p99_ratio > 1:
                missed.insert(1 if "mean" in missed else 0, "p99")
            verdict = ("goal met" if not missed
                       else "goal NOT met: " + ", ".join(missed))
        lines.append(f"{label}: {where} -> {policy} " + "; ".join(parts) + f": {verdict}")
    return lines


def markdown_summary(rows: list[dict], baseline: str = "vllm-fcfs") -> str:
    """Mean JCT per policy and QPS as a Markdown table, with each policy's ratio to the
    baseline and the baseline's mean slowdown (to see where it is overloaded)."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    head = ["QPS", f"{baseline} slowdown"] + [f"{p} mean JCT s (×FCFS)" for p in policies] + ["idle bound ×FCFS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    show_sigma = _shows_sigma(rows)
    for qps, sigma in dict.fromkeys((r["qps"], _sigma(r)) for r in rows):
        group = {r["policy"]: r for r in rows if r["qps"] == qps and _sigma(r) == sigma}
        base = group.get(baseline)
        cells = [("trace" if qps is None else f"{qps:g}")
                 + (f" (sigma {sigma:g})" if show_sigma else ""),
                 f"{base['mean_slowdown']:.2f}" if base else "-"]
        for p in policies:
            r = group.get(p)
            if r is None:
                cells.append("-")
            elif base:
                cells.append(f"{r['mean_jct_s']:.1f} (×{r['mean_jct_s'] / base['mean_jct_s']:.3f})")
            else:
                cells.append(f"{r['mean_jct_s']:.1f}")
        cells.append(f"×{base['mean_idle_jct_s'] / base['mean_jct_s']:.3f}" if base else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
