"""The control-plane host process of `astraea bench-service` (see `service_load`).

    python -m astraea.tools.bench.service_host --policy astraea --profile P --time-scale 0.1

Runs the real `control_plane.service.server.serve` with the same telemetry, log set-up and
start-up object freeze as `astraea-control-plane`, or with `--grpc-floor` an AgentService that
only answers. Its stdin takes two commands from the benchmark: ``reset`` starts a measurement
window of its `ServiceStats`, ``stats`` answers with them as one JSON line, ``interval``
answers with them and the raw plan latencies and starts the next window; EOF stops it. The
first line it prints says it is ready, with its port and pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time

from astraea.store import STORE_WRITERS
from astraea.tools.bench.service_load import DEFAULT_PROFILE, _proc_cpu_s


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's running children (Linux /proc)."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{task}/children") as f:
                pids += f.read().split()
    cpu = (_proc_cpu_s(int(pid)) for pid in pids)
    return sum(c for c in cpu if not math.isnan(c))  # NaN: exited meanwhile


def main(argv: list[str] | None = None) -> int:
    """The control plane as `astraea-control-plane` runs it, plus the stdin command channel."""
    from control_plane.service import server as cp_server
    from control_plane.service.context import ServiceConfig

    p = argparse.ArgumentParser(prog="python -m astraea.tools.bench.service_host")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--policy", default="astraea")
    p.add_argument("--profile", default=DEFAULT_PROFILE)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--log-level", default=None)
    p.add_argument("--cprofile", default=None)
    p.add_argument("--grpc-floor", action="store_true")
    p.add_argument("--state-dir", default=None, help="the control plane's durable state")
    p.add_argument("--store-writer", default="process", choices=STORE_WRITERS)
    p.add_argument("--max-unfinished-jobs", type=int, default=0,
                   help="the control plane's admission bound (0: its default)")
    args = p.parse_args(argv)
    from astraea.telemetry import setup_service_telemetry

    tel = setup_service_telemetry(p, "astraea-control-plane", args.log_level)

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def run() -> None:
        running = floor = None
        limits = ({"max_unfinished_jobs": args.max_unfinished_jobs}
                  if args.max_unfinished_jobs else {})
        if args.grpc_floor:
            floor, port, stats = await _floor_server(args.listen, ServiceConfig(**limits))
        else:
            running = await cp_server.serve(args.listen, args.policy, args.profile,
                                            ServiceConfig(time_scale=args.time_scale,
                                                          store_writer=args.store_writer,
                                                          **limits),
                                            metrics=tel.metrics, state=args.state_dir)
            port, stats = running.port, running.control_plane.stats
        cp_server.freeze_startup_objects()  # as astraea-control-plane's main does
        gc_time = _GcTimer()
        children_cpu0 = _children_cpu_s()
        reply({"ready": True, "port": port, "pid": os.getpid()})
        loop = asyncio.get_running_loop()
        prof = None
        try:
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                cmd = line.strip()
                if not line:
                    break
                if cmd == "reset":
                    gc_time.reset()
                    children_cpu0 = _children_cpu_s()
                    if args.cprofile:
                        import cProfile

                        prof = cProfile.Profile()
                        prof.enable()
                    stats.reset()
                    reply({"ok": True})
                elif cmd == "stats":
                    snap = stats.snapshot()
                    if prof is not None:
                        prof.disable()
                        prof.dump_stats(args.cprofile)
                        prof = None
                    snap["plans_total"] = running.planner.plans if running is not None else 0
                    # Its child processes (the SQLite writer: astraea/store/child_writer.py)
                    # work for it too.
                    snap["children_cpu_s"] = _children_cpu_s() - children_cpu0
                    snap["gc"] = gc_time.snapshot()
                    reply(snap)
                elif cmd == "interval":
                    # `astraea bench-soak`: this interval's figures with its raw plan
                    # latencies (exact percentiles over a long run), then the next interval.
                    snap = stats.snapshot()
                    snap["plan_latency_samples_s"] = list(stats.plan_latency_s)
                    snap["gc"] = gc_time.snapshot()
                    stats.reset()
                    gc_time.reset()
                    if args.cprofile:  # from the first interval on, written at each one
                        import cProfile

                        if prof is None:
                            prof = cProfile.Profile()
                        else:
                            prof.dump_stats(args.cprofile)  # stops it: enabled again below
                        prof.enable()
                    reply(snap)
                else:
                    reply({"error": f"unknown command {cmd!r}"})
        finally:
            if running is not None:
                await running.stop(grace=0.5)
            else:
                await floor.stop(0.5)

    try:
        asyncio.run(run())
    finally:
        tel.shutdown()
    return 0


async def _floor_server(listen: str, limits):
    """`--grpc-floor`: an AgentService whose handlers do nothing but answer, with the real
    control plane's message pattern (one token event per token, then done), on the same
    gRPC stack. What it costs per segment is the floor any Python grpc.aio control plane pays
    for this client API on this machine, before any scheduling, worker traffic or logging."""
    import grpc

    from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2
    from control_plane.service.stats import ServiceStats
    from worker.sim.backend import placeholder_token

    stats = ServiceStats()
    done_reason = {True: common_pb2.FINISH_REASON_TOOL_CALL,
                   False: common_pb2.FINISH_REASON_LENGTH}

    class Floor(agent_pb2_grpc.AgentServiceServicer):
        async def StartJob(self, request, context):
            stats.events["start_job"] += 1
            return agent_pb2.StartJobResponse(job_id=request.job_id)

        async def RunSegment(self, request, context):
            stats.events["run_segment"] += 1
            n = request.sampling.max_tokens
            for i in range(n):
                yield agent_pb2.RunSegmentEvent(tokens=agent_pb2.TokenEvent(
                    first_index=i, token_ids=[placeholder_token(request.job_id, i)]))
            yield agent_pb2.RunSegmentEvent(done=agent_pb2.SegmentDone(
                finish_reason=done_reason[bool(request.next_tool_category)],
                timings=common_pb2.Timings(decode_tokens=n)))

        async def ReportToolCall(self, request, context):
            stats.events["tool_call"] += 1
            return agent_pb2.ReportToolCallResponse()

        async def EndJob(self, request, context):
            stats.events["end_job"] += 1
            return agent_pb2.EndJobResponse()

    # The real control plane's channel options (message sizes, the pending-call bounds), so
    # that a burst of StartJob calls is answered here as there, not cancelled by gRPC core.
    server = grpc.aio.server(options=limits.server_options())
    agent_pb2_grpc.add_AgentServiceServicer_to_server(Floor(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    return server, port, stats


class _GcTimer:
    """Wall time of the cyclic garbage collector's runs, per generation."""

    def __init__(self) -> None:
        import gc

        self._t0 = 0.0
        self.reset()
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.runs = [0, 0, 0]
        self.longest_s = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        took = time.perf_counter() - self._t0
        gen = info.get("generation", 0)
        self.seconds[gen] += took
        self.runs[gen] += 1
        self.longest_s = max(self.longest_s, took)

    def snapshot(self) -> dict:
        return {"seconds": sum(self.seconds), "by_generation_s": list(self.seconds),
                "runs": list(self.runs), "longest_ms": 1e3 * self.longest_s}


if __name__ == "__main__":
    sys.exit(main())
