"""A synchronous, single-threaded wrapper around vLLM 0.32's in-process engine core.

`VllmEngine` speaks in jobs, not vLLM requests: it admits a job's segments, pauses a job
with one of the three KV actions (Preserve, Swap, Discard), preempts a running segment,
steps the engine and reports memory. It owns no thread and no event loop; the asyncio
backend calls it from one dedicated thread, because vLLM objects are not thread-safe.

How each KV action maps onto vLLM (measured in docs/vllm-spike, paths under vllm/):
* Preserve: every request is submitted `resumable=True`. When a segment ends, vLLM keeps
  the request as a paused streaming-input session with its blocks
  (`Scheduler._handle_stopped_request`, v1/core/sched/scheduler.py:2465). The next segment
  is a session update with the same request id; vLLM drops the last sampled token (it has
  no KV yet, `_update_request_as_session`, :1650), so the update re-sends it first.
* Discard: abort the request (its blocks go back to the pool, still prefix-cached) and
  evict their hashes (`KVCacheManager.evict_blocks`), so a resume recomputes everything.
* Swap: copy the blocks to host memory (`worker/vllm/swap.py`, the copies themselves in
  vLLM's worker, `worker/vllm/ext.py`), then discard. On swap-in a new request gets fresh
  blocks from `allocate_slots`, the copy goes back into them, and `num_computed_tokens`
  tells the scheduler they are already computed.

Each pause, swap or preemption gives the job a new vLLM request id `<job>#<n>`.

Swap-ins wait for room. vLLM gives blocks to its running requests as they grow, which the
control plane does not see, so a swap-in can find fewer free blocks than it was planned
with. Rather than recompute a context it has a copy of, the engine holds the admission (and,
to keep the plan's order, every admission ranked behind it) until the blocks are free; the
held blocks are reported as taken. If vLLM has nothing left to run, nothing will free them:
the held swap-in is handed back as preempted with its copy kept (SWAP), so the control plane
can make room with what it knows (evict a paused job) and admit it again.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# Read lazily by vllm.envs, so this is in time as long as no engine was built before.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; num_gpu_blocks_override sizes it

from astraea.plan import (
    KvAction,  # noqa: E402
    StepTiming,  # noqa: E402
)
from worker.backend import EngineError, EngineSegmentEnded, Sampling  # noqa: E402
from worker.vllm import sampling as to_vllm  # noqa: E402
from worker.vllm.config import (  # noqa: E402
    EXTENSION,  # noqa: F401  (re-exported: what vLLM loads by name)
    SCHEDULER,  # noqa: F401
    EngineConfig,
    engine_args,
)
from worker.vllm.swap import HostSwap  # noqa: E402

if TYPE_CHECKING:
    from worker.vllm.scheduler import StepSchedule

class JobKv(enum.Enum):
    """Where a job's KV is, as far as this engine is concerned."""

    RUNNING = "running"  # a segment is queued or generating
    PRESERVED = "preserved"  # segment ended; a paused vLLM session holds the blocks
    SWAPPED = "swapped"  # blocks copied to host memory and freed
    DISCARDED = "discarded"  # nothing kept; the next admission recomputes the context
    HELD = "held"  # admitted, waiting in this engine for room to swap in (or behind one)


@dataclass(frozen=True)
class Preemption:
    job_id: str
    generated_tokens: int  # tokens of this admission generated before it stopped
    action: KvAction  # what was done with its KV: SWAP or DISCARD
    held: bool = False  # a held swap-in handed back (vLLM ran nothing that would free room)


@dataclass(frozen=True)
class StepResult:
    """What one step produced: its tokens and segment ends, not only its timing."""

    tokens: dict[str, tuple[int, ...]]  # new tokens by job
    ended: tuple[EngineSegmentEnded, ...]  # finish_reason: vLLM's, "length" or "stop"
    preempted: tuple[Preemption, ...]  # vLLM ran out of blocks: our jobs, now DISCARDED
    timing: StepTiming | None  # None when the step ran no model
    # Per new token, the top-k logprobs (descending), for jobs admitted with `logprobs=k`.
    logprobs: dict[str, tuple[tuple[float, ...], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class MemorySnapshot:
    """The engine's KV memory now, as vLLM's block pool and the host copies count it."""

    total_blocks: int  # usable blocks (the pool minus the null block)
    free_blocks: int  # free, including free blocks still in the prefix cache
    host_swap_blocks_used: int
    host_swap_blocks_total: int
    running_seqs: int  # requests vLLM is running
    preserved_seqs: int  # paused sessions holding blocks
    held_swap_in_blocks: int = 0  # free blocks the held swap-ins will take

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks


@dataclass
class _Job:
    job_id: str
    history: list[int]  # every token vLLM has seen for the job: prompts and outputs
    kv: JobKv = JobKv.RUNNING
    serial: int = 0  # the current vLLM request is f"{job_id}#{serial}"
    generated: int = 0  # tokens of the current admission
    prefill_tokens: int = 0  # tokens scheduled for it before its first token

    @property
    def rid(self) -> str:
        return f"{self.job_id}#{self.serial}"


@dataclass
class _Held:
    """An admission the engine holds back until a swap-in ahead of it (or it) has room."""

    job: _Job
    prior: JobKv | None  # the job's KV when it was admitted; None: the job is new here
    new: list[int]
    max_tokens: int
    priority: float
    logprobs: int | None
    order: int  # admission order, for ties in priority
    sampling: Sampling | None = None

    @property
    def key(self) -> tuple[float, int]:
        return self.priority, self.order


class VllmEngine:
    """vLLM's `EngineCore` driven job by job. Not thread-safe: call from one thread."""

    _open = 0  # engines open in this process

    def __init__(self, config: EngineConfig) -> None:
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.executor import Executor

        self.config = config
        self.vllm_config = engine_args(config).create_engine_config()
        # What InprocClient does (v1/engine/core_client.py:353), minus the front end.
        self.core = EngineCore(self.vllm_config, Executor.get_class(self.vllm_config),
                               log_stats=False)
        self.max_model_len = self.vllm_config.model_config.max_model_len
        self._sched = self.core.scheduler
        self._kvm = self._sched.kv_cache_manager
        self._pool = self._kvm.block_pool
        self._block_size = self.vllm_config.cache_config.block_size
        if config.pipeline_parallel_size > 1:
            self.core.collective_rpc("pp_stage_buffers")  # a no-op where vLLM did it
        self._swap = HostSwap(self.core, self._block_size, config.host_swap_blocks)
        self.block_bytes = self._swap.block_bytes  # of every rank's shard together
        self._generation_config, self._eos_id = to_vllm.eos_settings(self.vllm_config.model_config)
        self._jobs: dict[str, _Job] = {}
        self._by_rid: dict[str, _Job] = {}
        self._held: dict[str, _Held] = {}
        self._admissions = 0
        self._closed = False
        VllmEngine._open += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        VllmEngine._open -= 1
        if VllmEngine._open == 0:
            self.core.shutdown()
            return
        # EngineCore.shutdown also tears down vLLM's process-wide distributed state
        # (v1/engine/core.py:839), which the engines still open in this process (tests,
        # tools) run on: release this engine's parts only (its grammar backend included, as
        # shutdown would), and leave that to the last one.
        self.core.structured_output_manager.clear_backend()
        self.core.model_executor.shutdown()
        self.core.scheduler.shutdown()

    # --- admission ------------------------------------------------------------------------

    def admit(self, job_id: str, new_token_ids: list[int] | tuple[int, ...], max_tokens: int,
              priority: float = 0.0, context_token_ids: list[int] | None = None,
              logprobs: int | None = None, sampling: Sampling | None = None) -> None:
        """Start the job's next segment: `new_token_ids` follow what the engine already has
        for the job (or `context_token_ids`, for a job it has never seen). Lower priority
        values are scheduled first. `sampling` (None: greedy) applies to this admission; its
        stop strings are the caller's to match (`stop_segment`)."""
        new = list(new_token_ids)
        job = self._jobs.get(job_id)
        if job is None:
            job = _Job(job_id, list(context_token_ids or ()))
        elif job.kv in (JobKv.RUNNING, JobKv.HELD):
            raise EngineError(f"admit {job_id}: a segment is already running")
        # The job itself can never run like this: admitting it again would not help.
        if max_tokens < 1:
            raise EngineError(f"admit {job_id}: max_tokens must be at least 1", retryable=False)
        if len(job.history) + len(new) + max_tokens > self.max_model_len:
            raise EngineError(f"admit {job_id}: {len(job.history) + len(new)} tokens plus "
                              f"{max_tokens} new exceed max_model_len {self.max_model_len}",
                              retryable=False)
        if not job.history and not new:
            raise EngineError(f"admit {job_id}: no tokens", retryable=False)

        self._admissions += 1
        held = _Held(job, job.kv if job_id in self._jobs else None, new, max_tokens,
                     priority, logprobs, self._admissions, sampling)
        if held.prior is JobKv.SWAPPED or self._held:
            # A swap-in may have to wait for blocks; anything behind one waits with it.
            self._jobs[job_id] = job
            job.kv = JobKv.HELD
            self._held[job_id] = held
            self._release_held()
            return
        self._dispatch(held)

    def _dispatch(self, h: _Held) -> None:
        """Hand an admission to vLLM; raises (changing nothing) if vLLM refuses it."""
        job, new = h.job, h.new
        if h.prior is None:  # first admission
            self._submit_new(job, job.history + new, h)
        elif h.prior is JobKv.PRESERVED:
            self._resume_session(job, new, h)
        elif h.prior is JobKv.SWAPPED:
            self._swap_in(job, new, h)
        else:  # DISCARDED: the whole context is prefilled again
            self._submit_new(job, job.history + new, h, next_rid=True)
        # Only now, when nothing above raised, does the job change.
        job.history += new
        job.kv = JobKv.RUNNING
        job.generated = job.prefill_tokens = 0
        self._jobs[job.job_id] = job

    def _release_held(self) -> None:
        """Dispatch held admissions in plan order (priority, then arrival) until a swap-in
        finds too few free blocks."""
        for h in sorted(self._held.values(), key=lambda h: h.key):
            if h.prior is JobKv.SWAPPED and not self._swap_in_fits(h.job):
                return
            self._unhold(h.job)
            try:
                self._dispatch(h)
            except EngineError:  # vLLM had less room than its free count said: wait on
                h.job.kv = JobKv.HELD
                self._held[h.job.job_id] = h
                return

    def _swap_in_fits(self, job: _Job) -> bool:
        return self._swap.blocks_of(job.job_id) <= self._pool.get_num_free_blocks()

    def _unhold(self, job: _Job) -> _Held:
        """Take a held admission back: the job returns to its KV state before it (a job new
        here: DISCARDED, with nothing computed). The caller keeps `new` in the history."""
        h = self._held.pop(job.job_id)
        job.kv = h.prior if h.prior is not None else JobKv.DISCARDED
        return h

    def _submit_new(self, job: _Job, tokens: list[int], h: _Held, next_rid: bool = False) -> None:
        serial = job.serial + 1 if next_rid else job.serial
        req = self._request(f"{job.job_id}#{serial}", tokens, h)
        self.core.add_request(req)
        self._bind(job, serial)

    def _resume_session(self, job: _Job, new: list[int], h: _Held) -> None:
        from vllm.v1.request import RequestStatus

        session = self._sched.requests.get(job.rid)
        if session is None or session.status != RequestStatus.WAITING_FOR_STREAMING_REQ:
            # An update to a session that is not paused would be queued, not applied.
            raise EngineError(f"admit {job.job_id}: its preserved session is gone")
        # vLLM drops the session's last sampled token (it has no KV yet): re-send it.
        update = self._request(job.rid, [job.history[-1], *new], h)
        self.core.add_request(update)
        # The update brings new sampling params but leaves the session's grammar as it was
        # (scheduler.py:1684): give it this segment's (compiled by `_request`), or none.
        session.structured_output_request = update.structured_output_request
        # Nor does vLLM's model runner re-seed the session (worker/vllm/ext.py).
        self.core.collective_rpc("session_seed", args=(job.rid, to_vllm.seed_of(h.sampling)))
        # The update keeps the session's old priority and arrival time; re-key it in the
        # queue of requests that hold blocks (scheduler.py:915), where it is waiting.
        queue = self._sched.kv_holding_waiting
        queue.remove_request(session)
        session.priority = h.priority
        queue.add_request(session)

    def _swap_in(self, job: _Job, new: list[int], h: _Held) -> None:
        if not self._swap_in_fits(job):
            raise EngineError(f"admit {job.job_id}: swap-in needs "
                              f"{self._swap.blocks_of(job.job_id)} blocks, "
                              f"{self._pool.get_num_free_blocks()} free")
        serial = job.serial + 1
        req = self._request(f"{job.job_id}#{serial}", job.history + new, h)
        self._swap.copy_in(job.job_id, req)
        self.core.add_request(req)
        self._bind(job, serial)

    # --- pause, preempt, abort ------------------------------------------------------------

    def pause(self, job_id: str, action: KvAction) -> None:
        """What happens to a job's KV after its segment ended (while it waits for a tool)."""
        job = self._job(job_id, "pause")
        if job.kv in (JobKv.RUNNING, JobKv.HELD):
            raise EngineError(f"pause {job_id}: a segment is running (preempt it)")
        if action is KvAction.PRESERVE:
            if job.kv is not JobKv.PRESERVED:
                raise EngineError(f"pause {job_id}: KV is {job.kv.value}, cannot preserve")
        elif action is KvAction.SWAP:
            if job.kv is not JobKv.PRESERVED:
                raise EngineError(f"pause {job_id}: KV is {job.kv.value}, cannot swap")
            self._swap_out(job)
        elif job.kv is JobKv.PRESERVED:  # DISCARD
            self._release(job)
            job.kv = JobKv.DISCARDED
        elif job.kv is JobKv.SWAPPED:  # DISCARD of a host copy
            self._swap.drop(job_id)
            job.kv = JobKv.DISCARDED

    def preempt(self, job_id: str, action: KvAction) -> Preemption:
        """Stop a running segment and swap or discard its KV. The job resumes with an
        `admit` of no new tokens and the rest of its `max_tokens`."""
        job = self._job(job_id, "preempt")
        if job.kv not in (JobKv.RUNNING, JobKv.HELD):
            raise EngineError(f"preempt {job_id}: no segment running")
        if action is KvAction.PRESERVE:
            raise EngineError(f"preempt {job_id}: a running segment cannot be preserved")
        if job.kv is JobKv.HELD:
            return self._preempt_held(job, action)
        done = action
        if action is KvAction.SWAP and self._computed_tokens(job) == 0:
            done = KvAction.DISCARD  # nothing computed yet, nothing to copy
        if done is KvAction.SWAP:
            self._swap_out(job)
        else:
            self._release(job)
            job.kv = JobKv.DISCARDED
        return Preemption(job_id, job.generated, done)

    def _preempt_held(self, job: _Job, action: KvAction) -> Preemption:
        """A held admission never started: the job's KV gets `action` from where it was."""
        h = self._unhold(job)
        done = KvAction.DISCARD
        if job.kv is JobKv.SWAPPED and action is KvAction.SWAP:
            done = KvAction.SWAP  # the host copy stays
        elif job.kv is JobKv.PRESERVED and action is KvAction.SWAP:
            self._swap_out(job)
            done = KvAction.SWAP
        elif job.kv is not JobKv.DISCARDED:
            self.pause(job.job_id, KvAction.DISCARD)
        job.history += h.new  # computed or not, they are the job's (the next admission
        job.generated = 0  # sends no new tokens after a preemption)
        return Preemption(job.job_id, 0, done)

    def abort(self, job_id: str) -> None:
        """Forget the job, wherever its KV is; a job not held is a no-op."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        if job.kv is JobKv.HELD:
            self._unhold(job)
        del self._jobs[job_id]
        if job.kv in (JobKv.RUNNING, JobKv.PRESERVED):
            self.core.abort_requests([job.rid])
        elif job.kv is JobKv.SWAPPED:
            self._swap.drop(job_id)
        self._by_rid.pop(job.rid, None)

    def stop_segment(self, job_id: str) -> EngineSegmentEnded:
        """End a running segment as vLLM ends one at EOS (the caller matched a stop string
        in its text after the last step): the request stays a paused session with its
        blocks, so the job's KV is PRESERVED."""
        from vllm.v1.request import RequestStatus

        job = self._job(job_id, "stop")
        req = self._sched.requests.get(job.rid)
        if job.kv is not JobKv.RUNNING or req is None or req.status != RequestStatus.RUNNING:
            raise EngineError(f"stop {job_id}: no segment generating")
        # What the scheduler does for a request that stopped in a step (scheduler.py:2225).
        req.status = RequestStatus.FINISHED_STOPPED
        self._sched._handle_stopped_request(req)
        self._sched.running.remove(req)
        job.kv = JobKv.PRESERVED
        return EngineSegmentEnded(job_id, job.generated, job.prefill_tokens, "stop")

    def _swap_out(self, job: _Job) -> None:
        self._swap.copy_out(job.job_id, job.rid, self._computed_tokens(job))
        self._release(job)
        job.kv = JobKv.SWAPPED

    def _release(self, job: _Job) -> None:
        """Free the job's blocks and drop them from the prefix cache."""
        block_ids = set(self._kvm.get_block_ids(job.rid)[0])
        # Abort frees them to the pool but keeps their hashes (free but cached) ...
        self.core.abort_requests([job.rid])
        # ... so evict those too (kv_cache_manager.py:665), or a resume would hit them.
        # `reset_prefix_cache` is no use: it needs every block free (block_pool.py:827).
        self._kvm.evict_blocks(block_ids)
        self._by_rid.pop(job.rid, None)

    # --- stepping -------------------------------------------------------------------------

    def has_work(self) -> bool:
        """Whether a step would run anything (paused sessions do not count)."""
        return self._sched.has_requests() or bool(self._held)

    def step(self) -> StepResult:
        """One engine step: admit what was held and has room now, schedule, run the model,
        sample."""
        handed_back = self._release_or_hand_back()
        started = time.perf_counter()
        outputs, executed = self.core.step()
        duration = time.perf_counter() - started
        self.core.post_step(executed)
        schedule = self._sched.take_schedule()

        timing = None
        preempted: list[Preemption] = handed_back
        if schedule is not None and schedule.tokens > 0:
            timing = StepTiming(schedule.tokens, schedule.context_tokens_read, duration)
            preempted += self._discard_vllm_preemptions(schedule)
            for rid, n in schedule.scheduled.items():
                job = self._by_rid.get(rid)
                if job is not None and job.generated == 0:
                    job.prefill_tokens += n

        tokens: dict[str, tuple[int, ...]] = {}
        logprobs: dict[str, tuple[tuple[float, ...], ...]] = {}
        ended: list[EngineSegmentEnded] = []
        for batch in outputs.values():
            for out in batch.outputs:
                job = self._by_rid.get(out.request_id)
                if job is None:  # aborted or preempted by us this step
                    continue
                self._take_output(job, out, tokens, logprobs, ended)
        return StepResult(tokens, tuple(ended), tuple(preempted), timing, logprobs)

    def _take_output(self, job: _Job, out, tokens: dict, logprobs: dict,
                     ended: list[EngineSegmentEnded]) -> None:
        new = tuple(out.new_token_ids)
        if new:
            job.history += new
            job.generated += len(new)
            tokens[job.job_id] = tokens.get(job.job_id, ()) + new
        if out.new_logprobs is not None:
            # Each row is the sampled token's logprob followed by the top-k.
            rows = tuple(tuple(sorted((float(x) for x in row[1:]), reverse=True))
                         for row in out.new_logprobs.logprobs)
            logprobs[job.job_id] = logprobs.get(job.job_id, ()) + rows
        if out.finish_reason is not None:
            ended.append(EngineSegmentEnded(job.job_id, job.generated, job.prefill_tokens,
                                            str(out.finish_reason)))
            # A resumable request stays as a paused session holding its blocks.
            job.kv = JobKv.PRESERVED if job.rid in self._sched.requests else JobKv.DISCARDED

    def _release_or_hand_back(self) -> list[Preemption]:
        """Dispatch held admissions that have room. While vLLM runs nothing, no blocks will
        come free: hand the first held swap-in back, copy kept, and try the rest."""
        handed_back = []
        self._release_held()
        while self._held and not self._sched.has_requests():
            h = min(self._held.values(), key=lambda h: h.key)
            p = self._preempt_held(h.job, KvAction.SWAP)
            handed_back.append(dataclasses.replace(p, held=True))
            self._release_held()
        return handed_back

    def _discard_vllm_preemptions(self, schedule: StepSchedule) -> list[Preemption]:
        """vLLM preempted requests to free blocks (scheduler.py:1571) and would recompute
        them by itself; the control plane decides when a job runs, so end the request."""
        preempted = []
        for rid, blocks in sorted(schedule.preempted.items()):
            job = self._by_rid.get(rid)
            if job is None:
                continue
            self.core.abort_requests([rid])
            # vLLM already freed the blocks; drop them from the prefix cache too.
            self._kvm.evict_blocks(set(blocks))
            self._by_rid.pop(rid, None)
            job.kv = JobKv.DISCARDED
            preempted.append(Preemption(job.job_id, job.generated, KvAction.DISCARD))
        return preempted

    # --- memory ---------------------------------------------------------------------------

    def memory(self) -> MemorySnapshot:
        """The pool's own numbers (never "blocks a job held": blocks can be shared)."""
        return MemorySnapshot(
            total_blocks=self._pool.num_gpu_blocks - 1,  # minus the null block
            free_blocks=self._pool.get_num_free_blocks(),  # block_pool.py:868
            host_swap_blocks_used=self._swap.used_blocks,
            host_swap_blocks_total=self.config.host_swap_blocks,
            running_seqs=len(self._sched.running),
            preserved_seqs=self._sched.num_waiting_for_streaming_input,
            held_swap_in_blocks=sum(self._swap.blocks_of(h.job.job_id)
                                    for h in self._held.values() if h.prior is JobKv.SWAPPED))

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (tests: start from a cold cache). Needs all blocks
        free (block_pool.py:827)."""
        if not self._kvm.reset_prefix_cache():
            raise EngineError("reset_prefix_cache: some blocks are in use")

    def host_blocks_held(self) -> int:
        """Blocks the worker itself holds on the host (a check on `memory()`)."""
        return self._swap.held_by_worker()

    def block_ids(self, job_id: str) -> list[int]:
        """The KV blocks the job holds in the pool now."""
        job = self._jobs.get(job_id)
        if job is None or job.kv not in (JobKv.RUNNING, JobKv.PRESERVED):
            return []
        return list(self._kvm.get_block_ids(job.rid)[0])

    def job_ids(self) -> list[str]:
        """The jobs the engine holds anything for (running, preserved, swapped, discarded)."""
        return list(self._jobs)

    def job_kv(self, job_id: str) -> JobKv | None:
        job = self._jobs.get(job_id)
        return job.kv if job else None

    def history_tokens(self, job_id: str) -> int:
        """Tokens of the job's history: every prompt and output token vLLM has seen for it."""
        job = self._jobs.get(job_id)
        return len(job.history) if job else 0

    # --- helpers --------------------------------------------------------------------------

    def _job(self, job_id: str, what: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise EngineError(f"{what} {job_id}: unknown job")
        return job

    def _bind(self, job: _Job, serial: int) -> None:
        self._by_rid.pop(job.rid, None)
        job.serial = serial
        self._by_rid[job.rid] = job

    def _computed_tokens(self, job: _Job) -> int:
        return self._sched.requests[job.rid].num_computed_tokens

    def _request(self, rid: str, tokens: list[int], h: _Held):
        from vllm.v1.engine import EngineCoreRequest

        params = to_vllm.sampling_params(h.sampling, h.max_tokens, h.logprobs,
                                 self._generation_config, self._eos_id)
        request = EngineCoreRequest(
            request_id=rid, prompt_token_ids=list(tokens), mm_features=None,
            sampling_params=params, pooling_params=None, arrival_time=time.time(),
            lora_request=None, cache_salt=None, data_parallel_rank=None,
            priority=h.priority, resumable=True)
        # Attaches the prefix-cache block hasher and compiles the grammar of a JSON schema
        # (v1/engine/core.py:1089).
        req = self.core.preprocess_add_request(request)[0]
        error = to_vllm.compile_grammar(req)
        if error is not None:  # refused before anything changed, not failed later
            raise EngineError(f"admit {h.job.job_id}: {error}", retryable=False)
        return req
