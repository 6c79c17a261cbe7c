"""`astraea chaos`'s verdict: each job of the chaos run compared with the clean run's (see
astraea.tools.chaos for what is compared and why), the kill table, and the JSON report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from astraea.tools.chaos import JobTokens, RunResult


def compare_job(clean: JobTokens, chaos: JobTokens) -> str | None:
    """None when the chaos run's job got what the clean run's did, else what differs."""
    if clean.error:
        return f"failed in the clean run: {clean.error}"
    if chaos.error:
        return f"failed in the chaos run: {chaos.error}"
    for run, rec in (("clean", clean), ("chaos", chaos)):
        if rec.path == "grpc" and rec.left_open:
            return f"the control plane did not finish it in the {run} run"
    if len(chaos.segments) != len(clean.segments):
        return f"{len(chaos.segments)} segments, clean run {len(clean.segments)}"
    for i, (a, b) in enumerate(zip(clean.segments, chaos.segments)):
        if a.count != b.count:
            return f"segment {i}: {b.count} tokens, clean run {a.count}"
        if a.tokens is not None or b.tokens is not None:
            if a.tokens != b.tokens:
                k = next((k for k, (x, y) in enumerate(zip(a.tokens or [], b.tokens or []))
                          if x != y), min(len(a.tokens or []), len(b.tokens or [])))
                return f"segment {i}: token ids differ from index {k}"
        elif not (a.text_ok and b.text_ok):
            run = "clean" if not a.text_ok else "chaos"
            return (f"segment {i}: the {run} run's text is not the engine's sequence for job "
                    f"{(a if run == 'clean' else b).served_by}")
    return None


@dataclass
class ChaosReport:
    clean: RunResult
    chaos: RunResult
    differences: dict[str, str]  # job id -> what differs (absent: the same)
    options: dict

    @property
    def ok(self) -> bool:
        """Every job the same as in the clean run, and every kill landed mid-replay."""
        return not self.differences and not any(k.skipped or k.recovered_s is None
                                                for k in self.chaos.kills)

    def totals(self) -> dict:
        jobs = self.chaos.jobs.values()
        by_path = {p: [j for j in jobs if j.path == p] for p in ("grpc", "http")}
        same = {p: sum(jid not in self.differences for jid, j in self.chaos.jobs.items()
                       if j.path == p) for p in by_path}
        segments = sum(len(j.segments) for j in jobs)
        tokens = sum(s.count for j in jobs for s in j.segments)
        return {"jobs": len(self.chaos.jobs), "grpc_jobs": len(by_path["grpc"]),
                "http_jobs": len(by_path["http"]), "grpc_same": same["grpc"],
                "http_same": same["http"], "segments": segments, "tokens": tokens,
                "clean_failed": sum(bool(j.error) for j in self.clean.jobs.values()),
                "chaos_failed": sum(bool(j.error) for j in jobs),
                "http_moved": sum(j.jobs_used > 1 for j in by_path["http"]),
                "http_left_open": sum(len(j.left_open) for j in by_path["http"]),
                "streams_cut": sum(k.streams_cut for k in self.chaos.kills),
                "http_retries": sum(j.retries for j in by_path["http"]),
                "clean_wall_s": round(self.clean.wall_s, 1),
                "chaos_wall_s": round(self.chaos.wall_s, 1)}

    def to_json(self) -> dict:
        return {"options": self.options, "ok": self.ok, "totals": self.totals(),
                "kills": [asdict(k) for k in self.chaos.kills],
                "differences": self.differences,
                "supervisor": self.chaos.supervisor,
                "logs": {"clean": self.clean.log_dir, "chaos": self.chaos.log_dir},
                "jobs": {jid: {"path": j.path, "segments": [s.count for s in j.segments],
                               "jobs_used": j.jobs_used, "retries": j.retries,
                               "left_open": j.left_open, "error": j.error} for jid, j in self.chaos.jobs.items()}}

    def format(self) -> str:
        t = self.totals()
        lines = [f"{'kill':<16}{'at (s)':>8}{'in flight':>13}{'recovered in (s)':>18}"
                 f"{'retries':>9}{'streams cut':>13}"]
        for k in self.chaos.kills:
            flight = f"{k.in_flight_grpc}({k.streaming})+{k.in_flight_http}"
            rec = (f"skipped: {k.skipped}" if k.skipped else "not recovered"
                   if k.recovered_s is None else f"{k.recovered_s:.1f}")
            line = (f"{k.service:<16}{k.at_s:>8.1f}{flight:>13}{rec:>18}{k.retries:>9}"
                    f"{k.streams_cut:>13}")
            if k.restored is not None:
                line += f"   restored {k.restored} jobs, {k.restored_mid_segment} mid-segment"
            lines.append(line)
        lines.append("(in flight: gRPC (of which mid-segment) + HTTP jobs started and not ended "
                     "at the kill; retries: "
                     "failed attempts the clients sent again, from the kill to the next; "
                     "streams cut: RunSegment streams among them cut after tokens had arrived, "
                     "resumed from the tokens received)")
        gw = ("in a state directory" if self.options.get("gateway_state")
              else "in memory only")
        lines.append(
            f"jobs: {t['jobs']} ({t['grpc_jobs']} gRPC with RetryPolicy, {t['http_jobs']} HTTP "
            f"through the gateway, its sessions {gw}); failed: clean run {t['clean_failed']}, chaos run "
            f"{t['chaos_failed']}")
        lines.append(f"gRPC jobs with every segment's token ids equal to the clean run's: "
                     f"{t['grpc_same']}/{t['grpc_jobs']}")
        if t["http_jobs"]:
            lines.append(
                f"HTTP jobs with every segment's token count equal to the clean run's and its "
                f"text the engine's sequence for its job: {t['http_same']}/{t['http_jobs']}; "
                f"requests sent again {t['http_retries']}; sessions moved to a new job (context "
                f"recomputed) {t['http_moved']}; jobs they left open on the control plane "
                f"{t['http_left_open']}")
        lines.append(f"chaos run: {t['segments']} segments, {t['tokens']} tokens; wall clean "
                     f"{t['clean_wall_s']} s, chaos {t['chaos_wall_s']} s")
        for jid, why in list(self.differences.items())[:10]:
            lines.append(f"  DIFFERS {jid}: {why}")
        if len(self.differences) > 10:
            lines.append(f"  ... and {len(self.differences) - 10} more")
        bad_kills = [k.service for k in self.chaos.kills if k.skipped or k.recovered_s is None]
        verdict = ("PASS: every job completed with the clean run's tokens, none lost, none "
                   "repeated" if self.ok else
                   f"FAIL: {len(self.differences)} job(s) differ" + (
                       f"; kills that did not land or recover: {', '.join(bad_kills)}"
                       if bad_kills else ""))
        lines.append(f"verdict: {verdict}")
        return "\n".join(lines)


def write_json(report: ChaosReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=1)
        f.write("\n")
