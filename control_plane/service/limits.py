"""Every bound the control plane puts on what clients and workers send it, in one place.

`Limits` is the base of `ServiceConfig`: `ServiceConfig(max_unfinished_jobs=100)` sets one,
and `astraea-control-plane` exposes those an operator tunes as flags (see `add_arguments`).
The defaults are safe for one host; docs/operations.md's "Limits" table lists them.

How a limit answers when crossed:
* a string or list too long: INVALID_ARGUMENT naming the field and the limit;
* a message larger than the server accepts: RESOURCE_EXHAUSTED from gRPC itself;
* too many unfinished jobs (in total, or from one client host): StartJob answers
  RESOURCE_EXHAUSTED with trailing metadata `retry-after-ms` (milliseconds, an integer);
* too many concurrent calls: gRPC refuses the call with RESOURCE_EXHAUSTED;
* a worker's memory report that contradicts its registration: its stream ends with
  INVALID_ARGUMENT.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GRPC_DEFAULT_MAX_RECEIVE = 4 << 20  # what a gRPC peer accepts unless configured otherwise
# Calls arrived but not yet taken by the server (gRPC core's queue). Beyond gRPC's own
# bounds (1,000 soft: refused at random; 3,000 hard) they are cancelled silently (CANCELLED,
# nothing logged), so both are raised to this, far above any concurrent-call bound: calls are
# then taken and answered (OK, or RESOURCE_EXHAUSTED past the concurrent-call bound).
PENDING_CALLS = 65_536
# How long a call may wait to be taken. gRPC core cancels a call still untaken after 30 s
# (CANCELLED, nothing logged): with 5,000 jobs on a saturated event loop (`astraea
# bench-soak`), thousands of RunSegment, ReportToolCall and StartJob calls were lost that way
# and their jobs left unfinished. An overloaded server now answers late, never drops; a
# client that cannot wait sets its own deadline.
UNTAKEN_CALL_TIMEOUT_S = 3600
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of an admission refusal


@dataclass(frozen=True)
class Limits:
    # --- strings and lists of the client API --------------------------------------------
    max_id_chars: int = 256  # job ids, categories, tool names
    max_reason_chars: int = 1024  # CancelJob.reason (it travels to the worker and the log)
    max_prompt_chars: int = 1 << 20  # prompt_text; token lists are bounded by the window
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_json_schema_chars: int = 64 << 10  # a schema is compiled per segment; bound the work
    # --- message sizes --------------------------------------------------------------------
    max_receive_message_bytes: int = GRPC_DEFAULT_MAX_RECEIVE  # any call, clients and workers
    max_send_message_bytes: int = GRPC_DEFAULT_MAX_RECEIVE  # to clients: what they accept
    # What a worker accepts (worker/process.py keeps gRPC's default): plans merged for one
    # write stop below it, and one action that alone exceeds it fails its job, not the worker.
    worker_max_receive_bytes: int = GRPC_DEFAULT_MAX_RECEIVE
    # --- admission ------------------------------------------------------------------------
    max_unfinished_jobs: int = 4096  # queued + running + in API wait, all clients
    max_jobs_per_client: int = 0  # per client host (peer address); 0: no per-client bound
    retry_after_ms: int = 1000  # the hint sent with an admission refusal
    # Concurrent calls of any kind (streams count while open: RunSegment, worker Connect);
    # 0 derives it from max_unfinished_jobs: each job may hold a segment stream and a call.
    max_concurrent_rpcs: int = 0
    # --- memory ---------------------------------------------------------------------------
    finished_retention_s: float = 300.0  # GetJob answers a finished job this long (wall s)
    max_finished_jobs: int = 10_000  # finished jobs kept at most; the oldest go first
    # A job in its API wait whose client made no call for it this long (wall s) is ended and
    # its KV freed; 0 never ends one.
    api_wait_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("max_id_chars", "max_reason_chars", "max_prompt_chars", "max_stop_strings",
                     "max_stop_chars", "max_json_schema_chars", "max_receive_message_bytes",
                     "max_send_message_bytes", "worker_max_receive_bytes",
                     "max_unfinished_jobs", "max_finished_jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_jobs_per_client", "retry_after_ms", "max_concurrent_rpcs",
                     "finished_retention_s", "api_wait_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def concurrent_rpcs(self) -> int:
        return self.max_concurrent_rpcs or 2 * self.max_unfinished_jobs + 256

    def server_options(self) -> list[tuple[str, int]]:
        """gRPC server channel arguments: message sizes, and gRPC core's bounds on calls
        waiting to be taken, in number (see PENDING_CALLS; with its defaults, 3,000 StartJob
        calls at once lost ~25 % as CANCELLED) and in time (UNTAKEN_CALL_TIMEOUT_S), so a
        burst or an overload is answered, never dropped."""
        pending = max(PENDING_CALLS, 4 * self.concurrent_rpcs)
        return [("grpc.max_receive_message_length", self.max_receive_message_bytes),
                ("grpc.max_send_message_length", self.max_send_message_bytes),
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", pending),
                ("grpc.server_max_unrequested_time_in_server", UNTAKEN_CALL_TIMEOUT_S)]


# Flags an operator would tune: (flag, field, type, help)
_FLAGS = (
    ("--max-unfinished-jobs", "max_unfinished_jobs", int,
     "jobs queued, running or in an API wait at once; StartJob beyond it is refused "
     "with RESOURCE_EXHAUSTED and a retry-after-ms hint"),
    ("--max-jobs-per-client", "max_jobs_per_client", int,
     "unfinished jobs per client host; 0: no per-client bound"),
    ("--max-concurrent-rpcs", "max_concurrent_rpcs", int,
     "concurrent gRPC calls (open streams count); 0: 2 x max-unfinished-jobs + 256"),
    ("--max-message-bytes", "max_receive_message_bytes", int,
     "largest message the server accepts or sends"),
    ("--worker-max-receive-bytes", "worker_max_receive_bytes", int,
     "largest message the workers accept (plans sent to them stay below it)"),
    ("--finished-retention", "finished_retention_s", float,
     "seconds a finished job stays visible to GetJob"),
    ("--api-wait-timeout", "api_wait_timeout_s", float,
     "end a job whose client made no call during its API wait for this many seconds, "
     "freeing its KV; 0 never does"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits")
    for flag, name, typ, help_text in _FLAGS:
        group.add_argument(flag, type=typ, default=getattr(Limits, name), dest=name,
                           help=f"{help_text} (default %(default)s)")


def from_args(args: argparse.Namespace) -> dict[str, int | float]:
    """The limit fields the flags set, as keyword arguments of `ServiceConfig`."""
    fields = {name: getattr(args, name) for _, name, _, _ in _FLAGS}
    fields["max_send_message_bytes"] = fields["max_receive_message_bytes"]
    return fields
