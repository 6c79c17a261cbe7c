"""A worker's Prometheus metrics: vLLM's gauges under vLLM's exact names, and KV counters.

`MeteredBackend` wraps the worker's engine backend (any object with the worker's `Backend`
methods) and watches what passes through it: the memory views it reports, the plan actions
it carries out, the preemptions it announces. Nothing here reaches into an engine except
for the size of a KV block (`_block_bytes`).

| name | kind | what |
|---|---|---|
| `vllm:num_requests_running` | gauge | sequences admitted on the engine (`WorkerView.running_seqs`, at most `max_seqs`) |
| `vllm:num_requests_waiting` | gauge | admitted beyond `max_seqs`: 0 in practice, since the control plane admits no more; the waiting queue is the control plane's (`astraea_queue_length`) |
| `vllm:gpu_cache_usage_perc`, `vllm:kv_cache_usage_perc` | gauge | GPU KV blocks in use, 0–1 (vLLM's older and current names; the Inference Extension reads either) |
| `vllm:num_preemptions_total` | counter | segments preempted (by a plan or by the engine) |
| `astraea_worker_kv_actions_total{kind}` | counter | KV actions carried out: `preserve`, `swap`, `discard` (pauses, evictions, preemptions) |
| `astraea_worker_swap_bytes_total{direction}` | counter | KV bytes copied to the host (`out`) and back (`in`) |
| `astraea_worker_preemptions_total` | counter | as `vllm:num_preemptions_total` |

The gauges carry vLLM's `model_name` label. A scrape reads only the last view the event loop
saw (a reference swap), never the engine, so it is safe on the server's thread.

Swap bytes: out, the host blocks a swap-out took (the view's `host_free_blocks` before and
after the action) times the block size; in, the blocks an `Admit(swap_in=True)` copies back.
A preemption the engine decides on its own (out of blocks) is counted as a preemption and a
KV action but its swap bytes are not seen.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from astraea.plan import Admit, Evict, KvAction, Pause, Preempt, WorkerView


class WorkerFamilies:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.kv_actions = Counter("astraea_worker_kv_actions", "KV actions carried out",
                                  ["kind"], registry=registry)
        self.swap_bytes = Counter("astraea_worker_swap_bytes",
                                  "KV bytes copied between GPU and host", ["direction"],
                                  registry=registry)
        self.preemptions = Counter("astraea_worker_preemptions", "Segments preempted",
                                   registry=registry)
        self.vllm_preemptions = Counter("vllm:num_preemptions", "Cumulative preemptions",
                                        ["model_name"], registry=registry)
        for kind in KvAction:  # every kind shows, 0 until it happens
            self.kv_actions.labels(kind.value)
        for direction in ("out", "in"):
            self.swap_bytes.labels(direction)


class MeteredBackend:
    """A worker backend that counts what passes through it (see the module docstring)."""

    def __init__(self, backend, registry: CollectorRegistry) -> None:
        self._backend = backend
        self.families = WorkerFamilies(registry)
        self._view: WorkerView | None = None
        self._model = ""
        registry.register(_VllmGauges(self))

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    # --- the Backend methods ---------------------------------------------------------------
    async def start(self) -> None:
        await self._backend.start()
        self._model = self._backend.describe().model
        self.families.vllm_preemptions.labels(self._model)
        self.view()

    async def stop(self) -> None:
        await self._backend.stop()

    async def release(self, job_id: str) -> None:
        await self._backend.release(job_id)

    def describe(self):
        return self._backend.describe()

    def view(self) -> WorkerView:
        self._view = self._backend.view()
        return self._view

    async def apply(self, action, segment=None):
        swap_out = isinstance(action, Pause | Evict | Preempt) and action.action is KvAction.SWAP
        host_free = self._backend.view().host_free_blocks if swap_out else 0
        out = await self._backend.apply(action, segment)
        view = self.view()
        f = self.families
        if isinstance(action, Pause | Evict):  # a preemption counts from its event
            f.kv_actions.labels(action.action.value).inc()
        taken = out.action if isinstance(action, Preempt) and out is not None else None
        if swap_out and (taken in (None, KvAction.SWAP)):
            f.swap_bytes.labels("out").inc(
                max(0, host_free - view.host_free_blocks) * self._block_bytes(view))
        if isinstance(action, Admit) and action.swap_in:
            f.swap_bytes.labels("in").inc(
                view.blocks_for(action.context_tokens) * self._block_bytes(view))
        return out

    async def events(self):
        async for ev in self._backend.events():
            new_view = getattr(ev, "view", None)
            if isinstance(new_view, WorkerView):  # MemoryChanged
                self._view = new_view
            elif isinstance(getattr(ev, "action", None), KvAction):  # SegmentPreempted
                self.families.preemptions.inc()
                self.families.vllm_preemptions.labels(self._model).inc()
                self.families.kv_actions.labels(ev.action.value).inc()
            yield ev

    def _block_bytes(self, view: WorkerView) -> int:
        """Bytes of one KV block: the vLLM engine's (`block_bytes`), or the simulated
        engine's profile (KV bytes per token × block size)."""
        engine = getattr(self._backend, "engine", None)
        size = getattr(engine, "block_bytes", None)
        if size is None:
            profile = getattr(engine, "profile", None)
            size = profile.kv_bytes_per_token * view.block_size if profile else 0
        return int(size)


class _VllmGauges:
    """The gauges, read at scrape time from the last view the backend passed on."""

    def __init__(self, backend: MeteredBackend) -> None:
        self._backend = backend

    def collect(self):
        v, labels = self._backend._view, [self._backend._model]
        if v is None:
            return
        running = GaugeMetricFamily("vllm:num_requests_running",
                                    "Requests running on the engine", labels=["model_name"])
        running.add_metric(labels, min(v.running_seqs, v.max_seqs))
        waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                    "Requests admitted and waiting to run", labels=["model_name"])
        waiting.add_metric(labels, max(0, v.running_seqs - v.max_seqs))
        yield from (running, waiting)
        for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
            usage = GaugeMetricFamily(name, "GPU KV-cache usage, 1 = full",
                                      labels=["model_name"])
            usage.add_metric(labels, min(1.0, max(0.0, v.utilization)) if v.total_blocks else 0.0)
            yield usage

    def describe(self):
        return []  # names come from collect(), at scrape time
