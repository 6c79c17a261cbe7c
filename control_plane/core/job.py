"""A job's lifecycle as the scheduler sees it.

A job alternates *segments* (the model generates) and *API waits* (a tool runs, the model is
idle for this job). The scheduler only knows what a real deployment knows: the tokens appended
before each segment, the tokens it generated, and hints such as the tool category. Output
lengths and tool durations of the future are never stored here: the simulator keeps those.

States::

    ARRIVED ──first segment──▶ READY ──admit──▶ RUNNING ──segment ends with a tool call──▶ API_WAIT ──tool returns──▶ READY
      ▲                │  └──segment ends (stop/length)──▶ FINISHED
      └──preempted─────┘
"""

from __future__ import annotations

from dataclasses import dataclass

from astraea.plan import JobState, KvAction, KvState


class IllegalTransition(RuntimeError):
    """An event arrived that the job's current state does not allow."""


@dataclass
class Job:
    """Mutable scheduler-side state of one job."""

    job_id: str
    arrival_s: float
    category: str = "unknown"
    state: JobState = JobState.ARRIVED
    kv_state: KvState = KvState.NONE
    worker_id: int | None = None
    level: int = 0  # MLFQ level (0 = highest priority)
    segment_index: int = 0
    context_tokens: int = 0  # tokens of the job held in its KV (prompt + outputs so far)
    pending_tokens: int = 0  # tokens appended for the current segment, not yet prefilled
    # Accounting used by the policies.
    waiting_s: float = 0.0  # accumulated time ready but not running (HRRN's W)
    ready_since_s: float = 0.0
    segment_cost: float = 0.0  # token cost attained by the current segment
    attained_s: float = 0.0  # GPU time of the job's ended admissions (PLAS's attained service)
    running_since_s: float | None = None  # when the current admission started (RUNNING only)
    preempting: bool = False  # a Preempt was planned and the worker has not answered yet
    api_start_s: float = 0.0
    next_tool_category: str | None = None
    # The client's own estimates for the current segment's output and the API wait after it
    # (None: predicted); set with each segment, kept through its API wait.
    hinted_output_tokens: int | None = None
    hinted_api_s: float | None = None
    finished_s: float | None = None

    # --- transitions -------------------------------------------------------------------
    def _expect(self, *states: JobState) -> None:
        if self.state not in states:
            allowed = ", ".join(s.value for s in states)
            raise IllegalTransition(
                f"job {self.job_id}: event needs state {allowed}, job is {self.state.value}"
            )

    def mark_running(self, now: float, worker_id: int) -> None:
        self._expect(JobState.READY)
        self.waiting_s += now - self.ready_since_s
        self.state = JobState.RUNNING
        self.worker_id = worker_id
        self.kv_state = KvState.RESIDENT

    def mark_preempted(self, now: float, generated_tokens: int) -> None:
        """The worker freed the job's blocks mid-segment; it must recompute on re-admission."""
        self._expect(JobState.RUNNING)
        self.context_tokens += self.pending_tokens + generated_tokens
        self.pending_tokens = 0
        self.kv_state = KvState.DISCARDED
        self.state = JobState.READY
        self.ready_since_s = now

    def mark_segment_end(self, now: float, generated_tokens: int, calls_tool: bool) -> None:
        self._expect(JobState.RUNNING)
        self.context_tokens += self.pending_tokens + generated_tokens
        self.pending_tokens = 0
        self.segment_index += 1
        if calls_tool:
            self.state = JobState.API_WAIT
            self.api_start_s = now
        else:
            self.state = JobState.FINISHED
            self.finished_s = now

    def mark_ready(self, now: float, new_tokens: int) -> None:
        """A new segment was submitted: the first one, or the one after a tool returned."""
        self._expect(JobState.ARRIVED, JobState.API_WAIT)
        self.pending_tokens = new_tokens
        self.segment_cost = 0.0
        self.state = JobState.READY
        self.ready_since_s = now

    def apply_kv_action(self, action: KvAction) -> None:
        self._expect(JobState.API_WAIT, JobState.READY)
        if action is KvAction.SWAP:
            self.kv_state = KvState.SWAPPED
        elif action is KvAction.DISCARD:
            # worker_id is kept as an affinity hint: that worker's prefix cache may still hit.
            self.kv_state = KvState.DISCARDED
        else:
            self.kv_state = KvState.RESIDENT

    # --- derived ----------------------------------------------------------------------
    def waiting_now(self, now: float) -> float:
        """HRRN's W: accumulated ready-but-not-running time, including the current wait."""
        if self.state is JobState.READY:
            return self.waiting_s + (now - self.ready_since_s)
        return self.waiting_s

    @property
    def kv_positions(self) -> int:
        """KV positions the job's blocks hold between segments: its history less the last
        sampled token, which has no KV until the next segment feeds it back (vLLM and the
        simulated engine alike). A history of k·block_size + 1 tokens fills only k blocks."""
        return max(self.context_tokens - 1, 0)

    @property
    def tokens_to_prefill(self) -> int:
        """What the next admission prefills: only the new tokens while the KV is kept (on the
        GPU or on the host), the whole context again once it was discarded."""
        if self.kv_state in (KvState.RESIDENT, KvState.SWAPPED):
            return self.pending_tokens
        return self.context_tokens + self.pending_tokens
