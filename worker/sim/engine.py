"""The simulated GPU engine: executes batch plans with a calibrated cost model, no model.

What it models, after vLLM v1:
* continuous batching with a per-step token budget; every running sequence decodes one token
  per step (max_num_seqs ≤ budget) and prefill chunks fill the rest, in admission order;
* KV capacity in blocks (block size 16) with a prefix cache of freed blocks (`kv_blocks.py`);
  when decoding runs out of blocks the most recently admitted sequence is preempted and
  recomputed later (vLLM's FCFS preemption);
* swap out/in over a host link of fixed bandwidth, one transfer at a time per direction,
  overlapped with compute (a swapped-in segment runs once its copy lands);
* step time from the profile: `c + a·tokens + k·context tokens read`.

The engine is driven from outside — `start_step(now)` returns the step's duration, then
`finish_step(now)` at that time reports what ended — so the same engine runs under the
discrete-event simulator (virtual time) and inside a live worker (real time).

Hot path: a step touches only prefilling sequences and those that end or need a block.
Decoding sequences advance implicitly with the global step counter: a sequence that entered
decoding holds context `base + step`, so the batch's context sum is `Σbase + n·step` and the
sequences needing a new block at a step are one residue class of `base mod block_size`.
A caller may also run the steps that change nothing it could see back to back, without a
call per step (`run_quiet_steps`).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass, field

from astraea.plan import KvAction, WorkerView
from astraea.profile import HardwareProfile
from worker.backend import EngineError, EngineSegmentEnded
from worker.sim.kv_blocks import BlockPool


def _kv_positions(history: int) -> int:
    """KV positions a paused job's blocks hold: its last sampled token has none yet."""
    return max(history - 1, 0)


@dataclass
class Sequence:
    job_id: str
    order: int  # admission order; preemption takes the latest first
    context_tokens: int  # history the segment resumes from (already in KV, or to recompute)
    to_prefill: int  # tokens still to prefill (recompute + new)
    prompt_total: int  # context + new tokens: the KV length when decoding starts
    max_tokens: int
    blocks: int = 0  # blocks held while prefilling (decoding sequences derive theirs)
    generated: int = 0
    prefilled: int = 0  # tokens actually prefilled this segment (reported as its cost)
    decoding: bool = False
    base: int = 0  # decoding: KV length at step s is base + s
    ready_at: float = 0.0  # a swapped-in sequence may not run before its copy lands
    version: int = 0  # invalidates stale entries of the finish heap
    decoding_at_removal: bool = False
    priority: float = 0.0  # prefill order: lower first, then admission order


@dataclass
class StepResult:
    """What starting (`preempted`) or finishing (`ended`, `first_token`) a step did."""

    ended: list[EngineSegmentEnded] = field(default_factory=list)
    preempted: list[tuple[str, int]] = field(default_factory=list)  # (job, generated so far)
    first_token: list[str] = field(default_factory=list)


@dataclass
class Transfer:
    job_id: str
    blocks: int
    done_at: float
    direction: str  # "out" or "in"


class SimulatedEngine:
    def __init__(self, profile: HardwareProfile, worker_id: int = 0,
                 kv_blocks: int | None = None) -> None:
        self.profile = profile
        self.worker_id = worker_id
        self.bs = profile.block_size
        total = kv_blocks if kv_blocks is not None else profile.kv_capacity_blocks
        if total < 1:
            raise ValueError(f"kv_blocks must be at least 1, got {total}")
        self.pool = BlockPool(total, self.bs)
        self.host_total = profile.host_swap_blocks
        self.host_used = 0
        self.budget = profile.max_num_batched_tokens
        self.max_seqs = profile.max_num_seqs
        self.step = 0
        self.busy = False
        self.last_step_s = profile.step_time_s(1, 0)
        self.last_step_tokens = 0  # shape of the current/last step, for step-time reports
        self.last_step_context_read = 0
        self.running: dict[str, Sequence] = {}  # admission order
        self._prefilling: dict[str, Sequence] = {}
        # The same sequences in prefill order, their prompts' total, and those admitted to
        # wait for a swap-in (the only ones that may not be ready yet): kept as they change,
        # since every step and every view asks.
        self._prefill_order: list[tuple[float, int, Sequence]] = []
        self._prefill_prompts = 0
        self._late: dict[str, Sequence] = {}
        self._n_decode = 0
        self._sum_base = 0
        self._residue = [0] * self.bs
        self._finish: list[tuple[int, int, str, int]] = []  # (step, order, job, version)
        # Versions are unique across sequences: a re-admitted job's new Sequence must not
        # match a stale finish entry of its preempted predecessor.
        self._versions = itertools.count(1)
        self._order = 0
        self.held: dict[str, tuple[int, int]] = {}  # ended/paused: job → (blocks, context)
        self.swapped: dict[str, tuple[int, int]] = {}  # job → (host blocks, context)
        self.transfers: list[Transfer] = []
        self._link_free_at = {"out": 0.0, "in": 0.0}
        self._step_plan: tuple[list, int, int] | None = None
        # counters
        self.tokens_prefilled = 0
        self.tokens_decoded = 0
        self.tokens_recomputed = 0
        self.tokens_swapped_out = 0
        self.tokens_swapped_in = 0
        self.prefix_hit_tokens = 0
        self.preemptions = 0
        self.peak_used_blocks = 0

    # --- plan actions -------------------------------------------------------------------
    def admit(self, job_id: str, new_tokens: int, context_tokens: int, max_tokens: int,
              swap_in: bool, now: float, priority: float = 0.0) -> None:
        """Start a segment. Prefill chunks go to segments by (priority, admission order):
        lower priority values first, as vLLM's priority scheduling orders its batch."""
        self._check_admit(job_id, new_tokens, context_tokens, max_tokens, swap_in)
        total = context_tokens + new_tokens
        ready_at = now
        if swap_in and self._cancel_swap_out(job_id):
            swap_in = False
        if job_id in self.held:
            blocks, ctx = self.held.pop(job_id)
            extra = self._blocks(total) - blocks
            self.pool.allocate(extra)
            blocks += extra
            to_prefill = new_tokens
        elif swap_in:
            host_blocks, ctx = self.swapped.pop(job_id)
            blocks = self._blocks(total)
            self.pool.allocate(blocks)
            start = max(now, self._link_free_at["in"])
            ready_at = start + self.profile.swap_time_s(ctx)
            self._link_free_at["in"] = ready_at
            self.transfers.append(Transfer(job_id, host_blocks, ready_at, "in"))
            self.tokens_swapped_in += ctx
            to_prefill = new_tokens
        else:
            self._drop_swapped(job_id)
            hit_blocks = self.pool.take_cached(job_id, context_tokens // self.bs)
            hit = hit_blocks * self.bs
            self.prefix_hit_tokens += hit
            blocks = self._blocks(total)
            self.pool.allocate(blocks - hit_blocks)
            to_prefill = total - hit
            self.tokens_recomputed += context_tokens - hit
        self._order += 1
        seq = Sequence(job_id, self._order, context_tokens, to_prefill, total, max_tokens,
                       blocks=blocks, ready_at=ready_at, priority=priority)
        self.running[job_id] = seq
        # Even with nothing new to prefill the sequence passes one prefill step, which
        # samples its first token (vLLM feeds the last token again).
        seq.to_prefill = max(to_prefill, 1)
        self._add_prefilling(seq, now)
        self._note_usage()

    def _check_admit(self, job_id: str, new_tokens: int, context_tokens: int, max_tokens: int,
                     swap_in: bool) -> None:
        """Everything `admit` may refuse, checked before it changes any state, so a refused
        admission leaves the job's KV exactly where it was."""
        if job_id in self.running:
            raise EngineError(f"job {job_id} is already running on worker {self.worker_id}")
        if max_tokens < 1:
            raise EngineError(f"job {job_id}: max_tokens must be at least 1")
        if new_tokens < 0 or context_tokens < 0:
            raise EngineError(f"job {job_id}: token counts must not be negative")
        if len(self.running) >= self.max_seqs:
            raise EngineError(f"job {job_id}: worker {self.worker_id} already runs "
                              f"{len(self.running)} sequences (max_num_seqs {self.max_seqs})")
        need = self._blocks(context_tokens + new_tokens)
        swapping_out = any(t.job_id == job_id and t.direction == "out" for t in self.transfers)
        if swap_in and swapping_out:
            kept = self.swapped[job_id]  # the copy is cancelled: its GPU blocks are reused
        elif job_id in self.held:
            kept = self.held[job_id]
        elif swap_in:
            if job_id not in self.swapped:
                raise EngineError(f"job {job_id} is not swapped out on worker {self.worker_id}")
            kept = (0, self.swapped[job_id][1])  # a swap-in allocates all its blocks anew
        else:
            kept = None
        if kept is not None:
            blocks, ctx = kept
            if ctx != context_tokens:
                raise EngineError(f"job {job_id}: worker {self.worker_id} holds {ctx} tokens of "
                                  f"context, the plan says {context_tokens}")
            need -= blocks
        # (A prefix-cache hit needs no extra room: the job's cached blocks already count as
        # allocatable, and a hit turns them into its own.)
        if need > self.pool.allocatable:
            raise EngineError(f"job {job_id}: needs {need} KV blocks, worker {self.worker_id} "
                              f"has {self.pool.allocatable}")

    def pause(self, job_id: str, action: KvAction, now: float) -> None:
        """Apply the KV action to a job whose segment just ended (its blocks are held)."""
        if job_id not in self.held:
            raise EngineError(f"job {job_id} has no paused KV on worker {self.worker_id}")
        if action is KvAction.PRESERVE:
            return
        self.evict(job_id, action, now)

    def evict(self, job_id: str, action: KvAction, now: float) -> None:
        if job_id not in self.held:
            raise EngineError(f"job {job_id} has no resident KV on worker {self.worker_id}")
        blocks, ctx = self.held[job_id]
        if action is KvAction.SWAP:
            if self.host_used + blocks > self.host_total:
                raise EngineError(f"job {job_id}: host swap space full")
            self.host_used += blocks
            start = max(now, self._link_free_at["out"])
            done = start + self.profile.swap_time_s(ctx)
            self._link_free_at["out"] = done
            self.transfers.append(Transfer(job_id, blocks, done, "out"))
            self.tokens_swapped_out += ctx
            # Blocks stay allocated until the copy completes; the job is swapped already.
            del self.held[job_id]
            self.swapped[job_id] = (blocks, ctx)
        elif action is KvAction.DISCARD:
            del self.held[job_id]
            self.pool.release_to_cache(job_id, blocks, _kv_positions(ctx))
        else:
            raise EngineError(f"evict needs SWAP or DISCARD, got {action.value}")

    def release(self, job_id: str) -> None:
        """The job finished or was cancelled: free what it holds (cached, like vLLM)."""
        if job_id in self.held:
            blocks, ctx = self.held.pop(job_id)
            self.pool.release_to_cache(job_id, blocks, _kv_positions(ctx))
        self._drop_swapped(job_id)

    def preempt(self, job_id: str, action: KvAction, now: float) -> tuple[int, KvAction]:
        """Stop a running segment; returns the tokens it generated so far and the KV action
        taken (asked for, or DISCARD where a swap is impossible). A decoding
        segment can be swapped out; a half-prefilled one is dropped (its computed prefix
        stays in the prefix cache)."""
        seq = self.running.get(job_id)
        if seq is None:
            raise EngineError(f"job {job_id} is not running on worker {self.worker_id}")
        blocks, valid, history = self._remove_running(seq)
        self.held[job_id] = (blocks, history)
        can_swap = seq.decoding_at_removal and self.host_used + blocks <= self.host_total
        self.preemptions += 1
        if action is KvAction.SWAP and can_swap:
            self.evict(job_id, KvAction.SWAP, now)
            return seq.generated, KvAction.SWAP
        del self.held[job_id]
        self.pool.release_to_cache(job_id, blocks, valid)
        return seq.generated, KvAction.DISCARD

    # --- stepping -----------------------------------------------------------------------
    def has_work(self, now: float) -> bool:
        if self._n_decode > 0:
            return True
        return len(self._prefilling) > sum(1 for s in self._late.values() if s.ready_at > now)

    def next_transfer_s(self) -> float | None:
        return min((t.done_at for t in self.transfers), default=None)

    def next_ready_s(self, now: float) -> float | None:
        """When a sequence waiting for its swap-in becomes runnable (if nothing runs now)."""
        return min((s.ready_at for s in self._late.values() if s.ready_at > now), default=None)

    def complete_transfers(self, now: float) -> None:
        done = [t for t in self.transfers if t.done_at <= now]
        if not done:
            return
        self.transfers = [t for t in self.transfers if t.done_at > now]
        for t in done:
            if t.direction in ("out", "out-dropped"):
                self.pool.release(t.blocks)  # GPU copy no longer needed
            else:
                self.host_used -= t.blocks

    def start_step(self, now: float) -> tuple[float, StepResult]:
        """Plan one step; returns its duration and the preemptions it needed."""
        if self.busy:
            raise EngineError("a step is already running")
        result = StepResult()
        s = self.step
        # Blocks that decoding sequences need for this step's token.
        need = self._residue[(-s) % self.bs] if self._n_decode else 0
        while need > self.pool.allocatable and self.running:
            victim = next(reversed(self.running.values()))
            if victim.decoding and (victim.base + s) % self.bs == 0:
                need -= 1  # it no longer needs its block for this step
            blocks, valid, _ = self._remove_running(victim)
            self.pool.release_to_cache(victim.job_id, blocks, valid)
            self.preemptions += 1
            result.preempted.append((victim.job_id, victim.generated))
        self.pool.allocate(need)
        tokens = self._n_decode
        context_read = self._sum_base + self._n_decode * s
        chunks = []
        left = self.budget - tokens
        for _, _, seq in self._prefill_order:
            if left <= 0:
                break
            if seq.ready_at > now:
                continue
            chunk = min(seq.to_prefill, left)
            prior = seq.prompt_total - seq.to_prefill
            chunks.append((seq, chunk))
            left -= chunk
            tokens += chunk
            context_read += prior
        if tokens == 0:
            return 0.0, result
        self._step_plan = (chunks, self._n_decode, s)
        self.busy = True
        self.last_step_tokens, self.last_step_context_read = tokens, context_read
        self.last_step_s = self.profile.step_time_s(tokens, context_read)
        self._note_usage()
        return self.last_step_s, result

    def may_run_quiet(self, now: float) -> bool:
        """Whether `run_quiet_steps(now, ...)` may run a step: idle, with sequences to step,
        and the next step neither finishes a sequence nor completes a prompt."""
        if self.busy or (self._finish and self._finish[0][0] <= self.step):
            return False
        n = self._n_decode
        head = self._quiet_head(now) if n < self.budget else None
        if head is not None:
            return head.to_prefill > self.budget - n
        return n > 0

    def _quiet_head(self, now: float) -> Sequence | None:
        """The prefilling sequence the next step gives its prefill budget to first."""
        return next((q for _, _, q in self._prefill_order if q.ready_at <= now), None)

    def run_quiet_steps(self, now: float, until: float, min_free: int | None = None,
                        max_step_s: float = float("inf")) -> float:
        """Run, back to back from `now`, the steps that change nothing a caller could see:
        the decoding sequences decode, at most one prefilling sequence takes a chunk that does
        not finish its prefill (no first token), none finishes, no block runs out (which
        would preempt); each step ends strictly before `until`, lasts at most `max_step_s`
        and, with `min_free`, leaves at least that many blocks allocatable. Returns the time
        the last of them ended (`now` if none ran); the next step then starts as usual.
        Exactly what `start_step` + `finish_step` would do for each: a simulator whose
        planner cannot act between events skips the round trips through its event queue."""
        if not self.may_run_quiet(now):
            return now
        pool, residue, bs, n = self.pool, self._residue, self.bs, self._n_decode
        # `start_step` gives the step's prefill budget to the first ready prefilling sequence
        # (by priority, then admission); while that chunk does not finish its prefill it is
        # the step's only chunk. Readiness cannot change before `until` (a swap-in landing
        # is an event).
        left = self.budget - n
        head = self._quiet_head(now) if left > 0 else None
        chunk = left if head is not None else 0
        # The loops repeat `start_step`'s arithmetic in the same order (the same floats); the
        # blocks are taken from the pool once at the end (the same blocks, in the same order).
        # At step `stop` a sequence finishes (or a stale entry is due): the slow path.
        stop = self._finish[0][0] if self._finish else 1 << 62
        non_attention = self.profile.non_attention_ms(n + chunk)
        k = self.profile.k_ms_per_context_token
        sum_base = self._sum_base
        avail, lowest = pool.allocatable, max(min_free or 0, 0)
        s0 = s = self.step
        t, taken, last = now, 0, self.last_step_s
        if head is None:  # pure decode
            while s < stop:
                need = residue[(-s) % bs]
                if avail - need < lowest:
                    break  # the slow path preempts, or the caller's plan may act after it
                duration = (non_attention + k * (sum_base + n * s)) / 1e3
                if t + duration >= until or duration > max_step_s:
                    break
                avail -= need
                taken += need
                t += duration
                last = duration
                s += 1
        else:  # and one prefill chunk, until the one that completes the prompt
            to_prefill = head.to_prefill
            prior = head.prompt_total - to_prefill  # the context the chunk reads
            while s < stop and to_prefill > chunk:
                need = residue[(-s) % bs]
                if avail - need < lowest:
                    break
                duration = (non_attention + k * (sum_base + n * s + prior)) / 1e3
                if t + duration >= until or duration > max_step_s:
                    break
                avail -= need
                taken += need
                to_prefill -= chunk
                prior += chunk
                t += duration
                last = duration
                s += 1
        if s != s0:
            steps = s - s0
            pool.allocate(taken)
            self.tokens_decoded += n * steps
            read = sum_base + n * (s - 1)
            if head is not None:
                head.to_prefill = to_prefill
                head.prefilled += chunk * steps
                self.tokens_prefilled += chunk * steps
                read += prior - chunk
            self.last_step_tokens = n + chunk
            self.last_step_context_read = read
            self.last_step_s = last
            self.step = s
            self._note_usage()  # allocation only grew: the last step's use is the peak
        return t

    def finish_step(self, now: float) -> StepResult:
        if not self.busy or self._step_plan is None:
            raise EngineError("no step is running")
        chunks, n_decode, s = self._step_plan
        self._step_plan = None
        self.busy = False
        result = StepResult()
        self.tokens_decoded += n_decode
        # Decoding sequences each produced a token at step s; some finish now.
        while self._finish and self._finish[0][0] <= s:
            _, _, job_id, version = heapq.heappop(self._finish)
            seq = self.running.get(job_id)
            if seq is None or seq.version != version or not seq.decoding:
                continue
            seq.generated = seq.max_tokens
            self._end_segment(seq, result)
        for seq, chunk in chunks:
            if self.running.get(seq.job_id) is not seq:
                continue  # preempted meanwhile
            seq.to_prefill -= chunk
            seq.prefilled += chunk
            self.tokens_prefilled += chunk
            if seq.to_prefill > 0:
                continue
            # Prefill done: the step sampled the segment's first token.
            self._drop_prefilling(seq.job_id)
            seq.generated = 1
            result.first_token.append(seq.job_id)
            if seq.max_tokens <= 1:
                self._end_segment(seq, result)
                continue
            self._start_decoding(seq, s)
        self.step += 1
        return result

    # --- views --------------------------------------------------------------------------
    def view(self) -> WorkerView:
        swapping_out = sum(t.blocks for t in self.transfers if t.direction == "out")
        return WorkerView(
            worker_id=self.worker_id,
            total_blocks=self.pool.total,
            free_blocks=self.pool.allocatable,
            block_size=self.bs,
            host_free_blocks=self.host_total - self.host_used,
            running_seqs=len(self.running),
            max_seqs=self.max_seqs,
            running_context_tokens=self._sum_base + self._n_decode * self.step
            + self._prefill_prompts,
            step_time_s=self.last_step_s,
            step_index=self.step,
            swapping_out_blocks=swapping_out,
            blocks_of=self.blocks_of,
            preemptible=self.is_decoding,
        )

    def generated_of(self, job_id: str) -> int:
        """Tokens a running segment has generated after the completed steps (a decoding
        sequence's count is implicit in the step counter)."""
        seq = self.running[job_id]
        if not seq.decoding:
            return seq.generated
        return seq.base + self.step - seq.prompt_total + 1

    def is_decoding(self, job_id: str) -> bool:
        """Decoding segments can be preempted (and swapped); prefilling ones finish first."""
        seq = self.running.get(job_id)
        return seq is not None and seq.decoding

    def blocks_of(self, job_id: str) -> int:
        if job_id in self.held:
            return self.held[job_id][0]
        seq = self.running.get(job_id)
        if seq is None:
            return 0
        if seq.decoding:
            return self._blocks(seq.base + self.step + (1 if self.busy else 0))
        return seq.blocks

    @property
    def used_blocks(self) -> int:
        return self.pool.used

    # --- internals ----------------------------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def _drop_swapped(self, job_id: str) -> None:
        """Forget a job's host copy (it will be recomputed, or the job ended). A swap-out
        still in flight completes as planned, freeing the GPU blocks it reads."""
        entry = self.swapped.pop(job_id, None)
        if entry is not None:
            self.host_used -= entry[0]
            for t in self.transfers:
                if t.job_id == job_id and t.direction == "out":
                    t.direction = "out-dropped"

    def _cancel_swap_out(self, job_id: str) -> bool:
        """A job swapped out moments ago comes back before its copy finished: its GPU blocks
        are still there, so keep them (as if preserved) and stop the copy."""
        pending = [t for t in self.transfers if t.job_id == job_id and t.direction == "out"]
        if not pending:
            return False
        self.transfers = [t for t in self.transfers if t not in pending]
        blocks, ctx = self.swapped.pop(job_id)
        self.host_used -= blocks
        self.held[job_id] = (blocks, ctx)
        return True

    def _add_prefilling(self, seq: Sequence, now: float) -> None:
        self._prefilling[seq.job_id] = seq
        bisect.insort(self._prefill_order, (seq.priority, seq.order, seq))
        self._prefill_prompts += seq.prompt_total
        if seq.ready_at > now:
            self._late[seq.job_id] = seq

    def _drop_prefilling(self, job_id: str) -> None:
        seq = self._prefilling.pop(job_id, None)
        if seq is None:
            return
        order = self._prefill_order
        del order[bisect.bisect_left(order, (seq.priority, seq.order))]
        self._prefill_prompts -= seq.prompt_total
        self._late.pop(job_id, None)

    def _start_decoding(self, seq: Sequence, s: int) -> None:
        """Prefill finished at step s (sampling token 1); decode step s' writes position
        base + s' and samples one more token, so the last token comes at s + max_tokens − 1."""
        seq.decoding = True
        seq.base = seq.prompt_total - (s + 1)
        self._n_decode += 1
        self._sum_base += seq.base
        self._residue[seq.base % self.bs] += 1
        seq.version = next(self._versions)
        finish = s + seq.max_tokens - seq.generated
        heapq.heappush(self._finish, (finish, seq.order, seq.job_id, seq.version))

    def _stop_decoding(self, seq: Sequence) -> None:
        if seq.decoding:
            seq.decoding = False
            self._n_decode -= 1
            self._sum_base -= seq.base
            self._residue[seq.base % self.bs] -= 1
            seq.version = next(self._versions)

    def _remove_running(self, seq: Sequence) -> tuple[int, int, int]:
        """Take a sequence out of the batch (preemption). Returns (blocks it holds, KV
        tokens validly computed, tokens of history: context + new + generated)."""
        seq.decoding_at_removal = seq.decoding
        if seq.decoding:
            valid = seq.base + self.step  # positions written by completed steps
            seq.generated = valid - seq.prompt_total + 1
            # A step in flight already holds the block for its position.
            blocks = self._blocks(valid + (1 if self.busy else 0))
            self._stop_decoding(seq)
        else:
            self._drop_prefilling(seq.job_id)
            valid = seq.prompt_total - seq.to_prefill
            blocks = seq.blocks
        del self.running[seq.job_id]
        return blocks, valid, seq.prompt_total + seq.generated

    def _end_segment(self, seq: Sequence, result: StepResult) -> None:
        self._stop_decoding(seq)
        self._drop_prefilling(seq.job_id)
        del self.running[seq.job_id]
        history = seq.prompt_total + seq.generated
        # The last sampled token has no KV yet: blocks cover history − 1 positions.
        self.held[seq.job_id] = (self._blocks(history - 1), history)
        result.ended.append(EngineSegmentEnded(seq.job_id, seq.generated, seq.prefilled))

    def _note_usage(self) -> None:
        used = self.pool.used
        if used > self.peak_used_blocks:
            self.peak_used_blocks = used
