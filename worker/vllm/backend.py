"""vLLM 0.32 as a worker backend: `worker.backend.Backend` over `VllmEngine`.

Threading (docs/vllm-spike/REPORT.md §5). vLLM objects are not thread-safe, so the backend
owns one engine thread (`ThreadPoolExecutor(max_workers=1)`) and *every* `VllmEngine` call —
construction, admit, pause, preempt, abort, step, memory — runs on it through
`loop.run_in_executor`. The executor serialises plan actions between steps with no locks.

A stepping task steps while the engine has work (`VllmEngine.has_work`: paused sessions do
not count) and otherwise waits until an `apply` wakes it.

The bookkeeping of admissions (`worker.backend.Admission`: emitted tokens, first-token time)
also lives on the engine thread, and so do the checks and handlers of `apply`
(`worker.backend.EngineBackend`): each call there builds its events and hands them to the
event loop with `call_soon_threadsafe`, which keeps them in the engine's own order (a step's
tokens always reach the queue before the SegmentPreempted of a Preempt applied after that
step). With the events goes a fresh memory snapshot from `VllmEngine.memory()`; `view()`
returns the newest.

Sampling: each admission samples as its `SegmentInput.sampling` says (temperature, top_p,
seed, a JSON schema for vLLM's structured outputs; none: greedy). Stop strings are matched
here, in the segment's text (vLLM's engine core does not: its front end does): text that may
begin a stop string is held back, and at a match the text stops before it, the token ids up
to the match are reported, and the engine ends the segment as at EOS (`stop_segment`, the KV
stays as a paused session).

Finish reasons: a segment the model ended itself (EOS, a stop string) is reported with
``finish_reason="stop"``; one that reached its `max_tokens` is reported with no reason, so the
control plane's rule (a `next_tool_category` hint → TOOL_CALL, else LENGTH) decides.

A swap-in with too few free blocks waits in the engine (`VllmEngine`, "held"), and the
blocks it will take are reported as used. A held swap-in the engine hands back (vLLM ran
nothing that would free room) is reported as preempted with its KV swapped
(`applied["swap_in_handed_back"]`).

A job placed here without its history (`SegmentInput.context`: it ran on another worker)
starts from that history, each prompt text tokenized as the first worker did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from astraea.plan import (
    Abort,
    Admit,
    Evict,
    KvAction,
    Pause,
    Preempt,
    WireAction,
    WorkerInfo,
    WorkerView,
)
from worker.backend import (
    Admission,
    BackendError,
    BackendEvent,
    BackendFailed,
    EngineBackend,
    MemoryChanged,
    SegmentInput,
    SegmentPreempted,
    TokensGenerated,
)
from worker.vllm.detokenize import StopText, TextStream
from worker.vllm.engine import EngineConfig, JobKv, VllmEngine


@dataclass(frozen=True)
class MemoryCheck:
    """One memory snapshot, checked on the engine thread against vLLM's block pool itself
    (blocks with no reference) and the host copies the worker extension holds."""

    view: WorkerView
    pool_free_blocks: int  # counted block by block in vLLM's BlockPool
    held_swap_in_blocks: int  # of those, what held swap-ins will take
    host_blocks_held: int  # counted in the worker extension's host copies
    host_total: int

    @property
    def ok(self) -> bool:
        v = self.view
        return (v.free_blocks == max(self.pool_free_blocks - self.held_swap_in_blocks, 0)
                and v.host_free_blocks == self.host_total - self.host_blocks_held)


@dataclass
class _Published:
    """What the engine thread last handed to the event loop: the memory view, and whether
    the engine has work (numbered, so that an older one never replaces a newer)."""

    seq: int
    view: WorkerView
    has_work: bool


class VllmBackend(EngineBackend):
    """`worker.backend.Backend` over `VllmEngine`, on one dedicated engine thread."""

    engine_name = "vLLM engine"

    def __init__(self, config: EngineConfig, worker_id: int = 0,
                 check_memory: bool = False) -> None:
        super().__init__(worker_id)
        self.config = config
        self.check_memory = check_memory  # verify every snapshot against the pool (tests)
        self.memory_checks: list[MemoryCheck] = []
        # What was carried out in vLLM, by kind: admit_<KV before>, pause_<action>,
        # evict_<action>, preempt_<action>, vllm_preempted, swap_in_held (waited for room),
        # swap_in_handed_back, released (after a refused Admit).
        self.applied: Counter[str] = Counter()
        self.engine: VllmEngine | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._snap: _Published | None = None
        self._info: WorkerInfo | None = None
        self._tokenizer = None
        # Engine-thread state (touched only there), besides the admissions.
        self._texts: dict[str, TextStream] = {}  # each running segment's text so far
        self._stops: dict[str, StopText] = {}  # the stop strings of segments that have them
        self._seq = 0
        self._step_index = 0
        self._step_time_s = 0.0
        self._last_memory: tuple | None = None
        self._origin = time.perf_counter()

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None or self._executor is not None:
            raise BackendError("backend already started")
        self._loop = asyncio.get_running_loop()
        model = Path(self.config.model)
        if not model.is_dir():
            raise BackendFailed(f"vLLM backend: model folder {str(model)!r} does not exist "
                                f"(give a local Hugging Face model folder)")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-engine")
        try:
            self.engine = await self._call(VllmEngine, self.config)
            await self._call(self._start_sync)
        except Exception as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise BackendFailed(f"vLLM engine failed to start with model {str(model)!r}: "
                                f"{type(exc).__name__}: {exc}") from exc
        self._task = self._loop.create_task(self._run(), name=f"vllm-backend-{self.worker_id}")

    def _start_sync(self) -> None:
        e = self.engine
        vc = e.vllm_config
        self._info = WorkerInfo(
            model=Path(self.config.model).name, backend="vllm", needs_history=True,
            kv_capacity_blocks=e.memory().total_blocks, block_size=vc.cache_config.block_size,
            host_swap_blocks=self.config.host_swap_blocks,
            max_num_seqs=vc.scheduler_config.max_num_seqs,
            max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens,
            profile_name="")
        self._origin = time.perf_counter()
        self._publish([], force_memory=True)

    async def _close(self) -> None:
        if self._executor is not None:
            if self.engine is not None:
                try:
                    await self._call(self.engine.close)
                except Exception:  # noqa: BLE001 - closing a broken engine
                    pass
            self._executor.shutdown(wait=True)

    def describe(self) -> WorkerInfo:
        if self._info is None:
            raise BackendError("backend not started")
        return self._info

    def view(self) -> WorkerView:
        if self._snap is None:
            raise BackendError("backend not started")
        return self._snap.view

    async def run_on_engine(self, fn: Callable[[VllmEngine], object]) -> object:
        """Run `fn(engine)` on the engine thread, between steps (tests, tools)."""
        return await self._call(fn, self.engine)

    # --- plan actions (on the engine thread) -------------------------------------------
    async def _carry_out(self, action: WireAction,
                         segment: SegmentInput | None) -> SegmentPreempted | None:
        return await self._call(self._carry_out_sync, action, segment)

    def _carry_out_sync(self, action: WireAction,
                        segment: SegmentInput | None) -> SegmentPreempted | None:
        preempted = self._dispatch(action, segment)
        self._publish([preempted] if preempted is not None else [])
        return preempted

    def _applied(self) -> None:
        self._wake.set()

    def _admit(self, a: Admit, seg: SegmentInput) -> None:
        e, j = self.engine, a.job_id
        kv = e.job_kv(j)
        context = None
        if seg.context:
            # The control plane sends the history when it believes this worker lacks it;
            # whatever the engine still has for the job is stale then.
            context = self._context_ids(seg.context)
            if kv is not None:
                e.abort(j)
                kv = None
        new = self._prompt_ids(seg, first=kv is None and not context)
        stop = seg.sampling.stop if seg.sampling is not None else ()
        if stop and not self._has_tokenizer():
            raise BackendError(f"job {j}: stop strings need the model's tokenizer.json",
                               retryable=False)
        e.admit(j, new, seg.max_tokens, priority=a.priority, context_token_ids=context,
                sampling=seg.sampling)
        self.applied[f"admit_{kv.value if kv else 'new'}"] += 1
        if e.job_kv(j) is JobKv.HELD and kv is JobKv.SWAPPED:
            self.applied["swap_in_held"] += 1
        if seg.first_index == 0:  # a new segment (not one resumed after a preemption)
            self._texts.pop(j, None)
            self._stops.pop(j, None)
        if stop and j not in self._stops:  # a resumed one keeps the text it held back
            self._stops[j] = StopText(stop)
        self._admissions[j] = Admission(self._now(), seg.first_index)

    def _pause(self, a: Pause | Evict, segment: None) -> None:
        self.engine.pause(a.job_id, a.action)
        self.applied[f"{type(a).__name__.lower()}_{a.action.value}"] += 1

    # To vLLM an Evict is a Pause: either way the job's segment has ended and its KV gets
    # the action (a PRESERVE eviction is refused before, by `check_action`).
    _evict = _pause

    def _preempt(self, a: Preempt, segment: None) -> SegmentPreempted:
        p = self.engine.preempt(a.job_id, a.action)
        self._admissions.pop(a.job_id, None)
        self.applied[f"preempt_{p.action.value}"] += 1
        return SegmentPreempted(p.job_id, p.generated_tokens, p.action)

    def _abort(self, a: Abort, segment: None) -> None:
        self.engine.abort(a.job_id)
        self._admissions.pop(a.job_id, None)
        self._texts.pop(a.job_id, None)
        self._stops.pop(a.job_id, None)

    async def release(self, job_id: str) -> None:
        if self._failed is not None:
            raise self._failed
        await self._call(self._release_sync, job_id)
        self._wake.set()

    def _release_sync(self, job_id: str) -> None:
        e = self.engine
        kv = e.job_kv(job_id)
        if kv in (JobKv.RUNNING, JobKv.HELD):
            e.preempt(job_id, KvAction.DISCARD)
        elif kv in (JobKv.PRESERVED, JobKv.SWAPPED):
            e.pause(job_id, KvAction.DISCARD)
        else:
            return  # unknown, or nothing held
        self._admissions.pop(job_id, None)
        self.applied["released"] += 1
        self._publish([])

    def _context_ids(self, pieces) -> list[int]:
        """A history from another worker as ids: prompt texts tokenized one by one, the
        first with the model's special tokens, exactly as `_prompt_ids` did there."""
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, str):
                ids += self._get_tokenizer().encode(piece, add_special_tokens=i == 0).ids
            else:
                ids += piece
        return ids

    def _prompt_ids(self, seg: SegmentInput, first: bool) -> list[int]:
        if seg.prompt_token_ids is not None:
            return list(seg.prompt_token_ids)
        if seg.prompt_text:
            tok = self._get_tokenizer()
            return tok.encode(seg.prompt_text, add_special_tokens=first).ids
        return []  # a resumed admission (after a preemption): nothing new

    def _get_tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = Path(self.config.model) / "tokenizer.json"
            if not path.is_file():
                raise BackendError(f"prompt_text needs {path} (send prompt_token_ids instead)")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def _has_tokenizer(self) -> bool:
        if self._tokenizer is None:
            try:
                self._get_tokenizer()
            except BackendError:
                self._tokenizer = False
        return bool(self._tokenizer)

    def _text(self, job_id: str, ids: tuple[int, ...], final: bool) -> tuple[str, bool]:
        """The text of a segment's new ids, and whether it reached a stop string (the text
        ends before it). One stream per segment, across its admissions, so a character
        split between chunks (or by a preemption) comes out whole."""
        if not self._has_tokenizer():
            return "", False
        stream = self._texts.get(job_id)
        if stream is None:
            tok = self._tokenizer
            stream = self._texts[job_id] = TextStream(
                lambda ids: tok.decode(ids, skip_special_tokens=True))
        text = stream.push(ids, final)
        stop = self._stops.get(job_id)
        stopped = False
        if stop is not None:
            text = stop.push(text, final)
            stopped = stop.stopped
        if final or stopped:
            self._texts.pop(job_id, None)
            self._stops.pop(job_id, None)
        return text, stopped

    # --- stepping -----------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                if self._snap is not None and self._snap.has_work:
                    await self._call(self._step_sync)
                    continue
                await self._wake.wait()
                self._wake.clear()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine broke: report it, accept nothing more
            self._fail(exc)

    def _step_sync(self) -> None:
        e = self.engine
        result = e.step()
        now = self._now()
        events: list[BackendEvent] = []
        if result.timing is not None:
            self._step_index += 1
            self._step_time_s = result.timing.duration_s
            events.append(result.timing)
        ended = {end.job_id: end for end in result.ended}
        for job_id, ids in result.tokens.items():
            adm = self._admissions.get(job_id)
            if adm is None:
                continue
            adm.first_token(now)
            text, stopped = self._text(job_id, ids, job_id in ended)
            events.append(TokensGenerated(job_id, ids, adm.next_index, text))
            adm.emitted += len(ids)
            if stopped:  # a stop string: the segment ends here, whatever vLLM would do next
                end = ended.get(job_id)
                ended[job_id] = (dataclasses.replace(end, finish_reason="stop") if end
                                 else e.stop_segment(job_id))
        for end in ended.values():
            adm = self._admissions.pop(end.job_id, None)
            if adm is not None:
                events.append(adm.ended(end, now))
        for p in result.preempted:  # vLLM's own (out of blocks), or a held swap-in
            if self._admissions.pop(p.job_id, None) is None:
                continue
            self.applied["swap_in_handed_back" if p.held else "vllm_preempted"] += 1
            events.append(SegmentPreempted(p.job_id, p.generated_tokens, p.action))
        self._publish(events)

    # --- reporting (engine thread) ------------------------------------------------------
    def _publish(self, events: list[BackendEvent], force_memory: bool = False) -> None:
        """Hand `events` and a fresh memory snapshot to the event loop, in order."""
        e = self.engine
        mem = e.memory()
        running = [j for j in e.job_ids() if e.job_kv(j) in (JobKv.RUNNING, JobKv.HELD)]
        ctx = sum(e.history_tokens(j) for j in running)
        view = WorkerView(
            worker_id=self.worker_id, total_blocks=mem.total_blocks,
            # Blocks a held swap-in will take are as good as used.
            free_blocks=max(mem.free_blocks - mem.held_swap_in_blocks, 0),
            block_size=self.config.block_size,
            host_free_blocks=mem.host_swap_blocks_total - mem.host_swap_blocks_used,
            running_seqs=len(running), max_seqs=self.config.max_num_seqs,
            running_context_tokens=ctx, step_time_s=self._step_time_s,
            step_index=self._step_index)
        self._seq += 1
        snap = _Published(self._seq, view, e.has_work())
        key = (view.total_blocks, view.free_blocks, view.host_free_blocks, view.running_seqs)
        if force_memory or key != self._last_memory:
            self._last_memory = key
            events.append(MemoryChanged(view))
            if self.check_memory:
                pool = e.core.scheduler.kv_cache_manager.block_pool
                free = sum(1 for b in pool.blocks if b.ref_cnt == 0 and not b.is_null)
                self.memory_checks.append(MemoryCheck(view, free, mem.held_swap_in_blocks,
                                                      e.host_blocks_held(),
                                                      mem.host_swap_blocks_total))
        self._loop.call_soon_threadsafe(self._deliver, snap, events)

    def _deliver(self, snap: _Published, events: list[BackendEvent]) -> None:
        if self._snap is None or snap.seq > self._snap.seq:
            self._snap = snap
        if self._failed is not None:
            return
        for ev in events:
            self._queue.put_nowait(ev)

    def _now(self) -> float:
        return time.perf_counter() - self._origin

    # --- helpers ------------------------------------------------------------------------
    def _call(self, fn, *args):
        return self._loop.run_in_executor(self._executor, fn, *args)
