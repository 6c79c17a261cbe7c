"""Every bound the predictor puts on its callers, in one place (docs/operations.md's "Limits" table).

Requests are untrusted: a value beyond a bound is refused with INVALID_ARGUMENT naming the
field; the burst clip (`BurstClip`) bounds how far valid-looking observations can move one
category's estimate.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GRPC_DEFAULT_MAX_RECEIVE = 4 << 20
# Calls arrived but not yet taken by the server (gRPC core's queue). Beyond gRPC's own
# bounds (1,000 soft: refused at random; 3,000 hard) they are cancelled silently (CANCELLED,
# nothing logged), so both are raised to this, far above any concurrent-call bound: calls are
# then taken and answered (OK, or RESOURCE_EXHAUSTED past the concurrent-call bound).
PENDING_CALLS = 65_536
# gRPC core also cancels a call untaken after 30 s (CANCELLED, nothing logged): an overloaded
# predictor answers late instead (the control plane's calls carry their own deadlines).
UNTAKEN_CALL_TIMEOUT_S = 3600


@dataclass(frozen=True)
class PredictorLimits:
    max_batch: int = 10_000  # elements per request; bounds the time one call holds the lock
    max_id_chars: int = 256  # job ids and categories
    max_api_duration_s: float = 3600.0  # one observed tool call; longer is not a tool call
    max_step_duration_s: float = 60.0  # one engine step
    max_output_tokens: int = 1 << 20  # one segment's output
    # Once a category has `clip_after` observations, one more counts at most `clip_factor`
    # times the category's mean as it was at most `clip_refresh_s` ago (see BurstClip).
    clip_factor: float = 10.0
    clip_refresh_s: float = 60.0
    clip_after: int = 32
    max_receive_message_bytes: int = GRPC_DEFAULT_MAX_RECEIVE
    max_send_message_bytes: int = GRPC_DEFAULT_MAX_RECEIVE
    max_concurrent_rpcs: int = 256  # beyond it calls are refused with RESOURCE_EXHAUSTED
    max_workers: int = 8  # handler threads

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.clip_factor <= 1:
            raise ValueError(f"clip_factor must be > 1, got {self.clip_factor}")

    def server_options(self) -> list[tuple[str, int]]:
        pending = max(PENDING_CALLS, 4 * self.max_concurrent_rpcs)
        return [("grpc.max_receive_message_length", self.max_receive_message_bytes),
                ("grpc.max_send_message_length", self.max_send_message_bytes),
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", pending),
                ("grpc.server_max_unrequested_time_in_server", UNTAKEN_CALL_TIMEOUT_S)]


class BurstClip:
    """Bounds how far a burst of API observations moves one category's estimate.

    Each observation of a category seen `after` times already is clipped to `factor` times a
    reference: the category's mean, re-read at most every `refresh_s`. (The first `after` are
    not: a new category's own spread is still unknown; they are bounded by
    `max_api_duration_s` alone.) Within one period every
    sample entering the window is <= factor x reference, so the window's mean (and each of its
    quantiles) stays <= factor x reference however many samples arrive: a flood of fake
    durations moves the estimate by at most that factor per period. A genuine change of a
    tool's latency by F is still learned, within about log(F) / log(factor) periods (two
    minutes for F = 100 at the defaults). Not thread-safe: called under the predictor's lock.
    """

    def __init__(self, factor: float, refresh_s: float, after: int) -> None:
        self.factor = factor
        self.refresh_s = refresh_s
        self.after = after
        self._seen: dict[str, int] = {}  # observations per category since start (or a load)
        self._reference: dict[str, tuple[float, float]] = {}  # category -> (mean, taken at)

    def clip(self, category: str, duration_s: float, mean_now: float, now: float) -> float:
        seen = self._seen[category] = self._seen.get(category, 0) + 1
        if seen <= self.after:
            return duration_s
        ref = self._reference.get(category)
        if ref is None or now - ref[1] >= self.refresh_s:
            ref = self._reference[category] = (mean_now, now)
        return min(duration_s, self.factor * ref[0])

    def forget(self) -> None:
        """The estimates were replaced (a state load): references are re-read."""
        self._reference.clear()
        self._seen.clear()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits")
    group.add_argument("--max-api-duration", type=float, dest="max_api_duration_s",
                       default=PredictorLimits.max_api_duration_s, metavar="SECONDS",
                       help="refuse observed tool calls longer than this (default %(default)s)")
    group.add_argument("--clip-factor", type=float, default=PredictorLimits.clip_factor,
                       help="an API observation counts at most this times its category's "
                            "recent mean (default %(default)s)")
    group.add_argument("--max-concurrent-rpcs", type=int,
                       default=PredictorLimits.max_concurrent_rpcs,
                       help="concurrent calls; beyond it RESOURCE_EXHAUSTED (default %(default)s)")


def from_args(args: argparse.Namespace) -> PredictorLimits:
    return PredictorLimits(max_api_duration_s=args.max_api_duration_s,
                           clip_factor=args.clip_factor,
                           max_concurrent_rpcs=args.max_concurrent_rpcs)
