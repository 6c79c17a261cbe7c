"""What durable state costs the control plane's process, apart from everything else it does.

    python -m astraea.tools.bench.durability --state-dir /tmp/s [--database URL] --rounds 3 \
        [--store-writer process|thread]

One process, one event loop, as in the control plane: `--streams` job loops each run segments
the way the benchmark's clients do (StartJob, then per segment: RunSegment, two token chunks,
the segment's end, a tool call START and END; EndJob after `--segments` segments) through the
control plane's own `Durability` (control_plane/service/durable.py), with the real event gate
(`Durability.emit` / `run_gate`: every event waits for a commit issued after its writes). Each
event also burns `--work-us` of CPU on the loop, standing in for the control plane's own work.
Runs alternate in memory (events released at once, no store) and with each store given, so a
busy shared machine weighs on all alike. Reported per run: segments/s, CPU ms per segment
of the whole process and of the event loop's thread (the rest is the store's writer thread),
of SQLite's writer process (`--store-writer process`, the control plane's default), commits,
and write statements per segment (a job's start and end included).
The difference from the in-memory run is what durability costs per segment; `astraea
bench-service` gives what the whole control plane costs per segment, to set it against.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from astraea.store import STORE_WRITERS


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _spin(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def _run(target: str | None, args: argparse.Namespace) -> dict:
    from astraea.plan import JobState
    from astraea.store import open_store
    from astraea.tools.bench.service_host import _children_cpu_s
    from astraea.v1 import agent_pb2, common_pb2
    from control_plane.core.job import Job
    from control_plane.service.durable import Durability
    from control_plane.service.registry import JobEntry, SegmentCall

    writer = args.store_writer if target and not target.startswith("postgres") else "thread"
    store = open_store(target, writer=writer) if target else None
    durable = Durability(store) if store is not None else None
    gate = asyncio.create_task(durable.run_gate()) if durable is not None else None
    done, stop = 0, False
    work = args.work_us
    request = agent_pb2.RunSegmentRequest(prompt_token_ids=common_pb2.TokenIds(ids=[1] * 8))
    sampling = common_pb2.SamplingParams(max_tokens=4)

    async def event() -> None:
        _spin(work)
        q: asyncio.Queue = asyncio.Queue()
        if durable is None:
            q.put_nowait(None)
        else:
            durable.emit(q, None)
        await q.get()

    async def job_loop() -> None:
        nonlocal done
        while not stop:
            entry = JobEntry(job=Job(job_id=uuid.uuid4().hex, arrival_s=0.0, category="qa"),
                             arrival_unix_s=time.time(), client="127.0.0.1")
            job = entry.job
            _spin(work)
            if durable is not None:
                durable.job_started(entry)
                await durable.flush()
            for s in range(args.segments):
                _spin(work)
                seg = SegmentCall(index=s, new_tokens=8, max_tokens=4, sampling=sampling,
                                  request=request, calls_tool=True, tool_category="search",
                                  submitted_s=0.0, wait_before=0.0)
                if durable is not None:
                    durable.segment_accepted(entry, seg)
                await asyncio.sleep(0)
                for _ in range(2):
                    seg.next_index += 2
                    entry.generated_total += 2
                    if durable is not None:
                        durable.tokens(entry, seg, [5, 6])
                    await event()
                job.state, job.segment_index, job.context_tokens = (
                    JobState.API_WAIT, s + 1, 12 * (s + 1))
                if durable is not None:
                    durable.segment_ended(entry, seg, common_pb2.FINISH_REASON_TOOL_CALL)
                await event()
                for tool_open in (True, False):
                    _spin(work)
                    entry.tool_started_s = 0.0 if tool_open else None
                    if durable is not None:
                        durable.tool_reported(entry, "search")
                    await asyncio.sleep(args.tool_ms / 1e3 if tool_open else 0)
                done += 1
            _spin(work)
            job.state, entry.finished_unix_s = JobState.FINISHED, time.time()
            if durable is not None:
                durable.job_finished(entry, "EndJob", error=False)
                await durable.flush()

    tasks = [asyncio.create_task(job_loop()) for _ in range(args.streams)]
    await asyncio.sleep(args.warmup)
    d0, c0, m0, t0 = done, _cpu(), time.thread_time(), time.perf_counter()
    k0 = _children_cpu_s()
    await asyncio.sleep(args.seconds)
    d1, c1, m1, t1 = done, _cpu(), time.thread_time(), time.perf_counter()
    k1 = _children_cpu_s()
    stop = True
    await asyncio.gather(*tasks)
    commits = statements = None
    if store is not None:
        gate.cancel()
        durable.drain()
        store.flush()
        commits, statements = store.commits, store.statements
        store.close()
    n = max(1, d1 - d0)
    return {"segments_per_s": n / (t1 - t0), "cpu_ms_per_segment": 1e3 * (c1 - c0) / n,
            "loop_cpu_ms_per_segment": 1e3 * (m1 - m0) / n, "commits": commits,
            "child_cpu_ms_per_segment": 1e3 * (k1 - k0) / n,
            "statements_per_segment": None if statements is None else statements / max(1, done),
            "load_average": os.getloadavg()[0]}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m astraea.tools.bench.durability",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", default=None,
                   help="measure SQLite state, in a new directory under this one per run")
    p.add_argument("--database", default=None, help="measure this PostgreSQL database too")
    p.add_argument("--rounds", type=int, default=3, help="alternations of every mode")
    p.add_argument("--store-writer", choices=STORE_WRITERS, default="process",
                   help="where SQLite's statements run (the control plane's --store-writer)")
    p.add_argument("--streams", type=int, default=50, help="job loops in flight")
    p.add_argument("--segments", type=int, default=8, help="segments per job")
    p.add_argument("--work-us", type=float, default=400.0,
                   help="CPU burnt on the event loop per event (the control plane's own work)")
    p.add_argument("--tool-ms", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=1.0)
    args = p.parse_args(argv)
    modes: list[tuple[str, str | None]] = [("memory", None)]
    if args.state_dir:
        modes.append(("sqlite", args.state_dir))
    if args.database:
        modes.append(("postgresql", args.database))
    print(f"{'mode':10} {'segments/s':>10} {'CPU ms/seg':>10} {'loop thread':>11} "
          f"{'child':>6} {'commits':>8} {'writes/seg':>10} {'load':>5}")
    for _ in range(args.rounds):
        for name, target in modes:
            if name == "sqlite":  # a fresh state directory per run
                Path(args.state_dir).mkdir(parents=True, exist_ok=True)
                target = tempfile.mkdtemp(prefix="run-", dir=args.state_dir)
            r = asyncio.run(_run(target, args))
            print(f"{name:10} {r['segments_per_s']:10.1f} {r['cpu_ms_per_segment']:10.3f} "
                  f"{r['loop_cpu_ms_per_segment']:11.3f} {r['child_cpu_ms_per_segment']:6.3f} "
                  f"{r['commits'] or '-':>8} "
                  f"{_fmt(r['statements_per_segment']):>10} "
                  f"{r['load_average']:5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
