"""Every scheduling knob in one place, with the default and why.

Defaults were picked by measurement on the InferCept mix (`astraea bench`); the sweep that
chose them is recorded in docs/results/README.md ("How the defaults were chosen").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class MlfqConfig:
    """Stateful-MLFQ (docs/design.md, "Stateful-MLFQ")."""

    num_levels: int = 4
    # Quota of level 0 in token cost (prefill-token equivalents, see token_cost.py); level k
    # gets quota_base · quota_growth**k. A segment that exceeds its level's quota is demoted.
    quota_base: float = 8000.0
    quota_growth: float = 4.0
    # A job in the lowest level whose response ratio (W + T) / T exceeds this moves to level 0
    # (W and T as HRRN ranks them: see age_weight and t_exponent).
    aging_ratio: float = 8.0
    # True: fill the batch from every level in order (work-conserving, the default).
    # False: the paper's text — only the first non-empty level is considered.
    work_conserving: bool = True
    # Promote a job one level when a segment yields to an API before using its quota.
    promote_on_api_yield: bool = True
    # Tell the worker to prefill admitted segments in MLFQ order (level, then predicted
    # compute time) instead of admission order.
    prioritize_prefill: bool = True
    # With `prioritize_prefill`, how fast a segment's place in the worker's prefill order ages:
    # a later-admitted segment of the same level goes first only if its predicted compute is
    # shorter by more than (admission gap / this). 0: no aging, shortest first for ever. It
    # cut the InferCept mix's p99 at QPS 4 without the running-segment cap below, and is
    # neutral with it (docs/results/tail-tuning.md), so it is off.
    prefill_aging_ratio: float = 0.0
    # Reserve memory for a starving job: when a candidate whose response ratio is at least
    # this cannot be admitted (it does not fit), the fill stops there instead of handing the
    # memory that frees up to smaller jobs behind it. 0: never (a large context can then be
    # passed over for as long as smaller segments keep arriving). Honoured only while the
    # blocks it waits for could come by free copies (`kv.free_copy_step_share`): there the
    # wait is a step or two; where copies are slow it idled the engine (long-context
    # sessions, 2 and 4 both: p99 +0.5 %). On the tiny-agent pool it is what keeps a job
    # under way from being overtaken by new ones (docs/results/tiny-agent.md).
    reserve_ratio: float = 2.0
    # HRRN's W also credits the job's progress: W_eff = W + age_weight·(age − W), age − W
    # being the time it spent running or in API calls. 0: the paper's W (ready-but-waiting
    # time only); 1: W is the job's age. Jobs under way then outrank new ones sooner: they
    # finish, and give back the memory their context holds through API waits, earlier.
    age_weight: float = 3.0
    # Admit at most this share of the worker's step token budget (max_num_batched_tokens) as
    # running segments: each decoding segment takes one token of every step, so 1/8 leaves
    # 7/8 of the budget for prefill, keeps steps short, and keeps the queue in the MLFQ, where
    # W grows, rather than in the worker's prefill queue, where it does not. 0: no cap beyond
    # the engine's max_num_seqs (and `max_running_per_worker`). Astraea's policy only.
    running_budget_share: float = 0.125
    # HRRN ranks by W / T^t_exponent (T in seconds): below 1 a wrong output-length estimate
    # moves a job's rank less (a 10x overestimate costs 10^t_exponent, not 10x). 1: HRRN.
    t_exponent: float = 0.5
    # A job that has not started yet, with a prompt longer than the 1 - share of the
    # worker's KV blocks this leaves free, is admitted only while its prompt plus the whole
    # contexts of the worker's jobs under way that run, hold KV while ready, or are predicted
    # back from their tool within its predicted compute time fit in this share of the blocks.
    # Without it a new 100k-token prompt got in by swapping out contexts due back in a
    # second, and every job of the burst then ran slower (each decode step reads every
    # running context). 0: no limit. Swept 0.8-1.0 on long-context sessions; no GPT-J
    # workload has prompts that long (docs/results/long-context-tuning.md).
    new_job_kv_share: float = 0.9
    # True: once a ready job does not fit a worker's memory, jobs that have not started yet
    # are not admitted to that worker behind it in the same fill (jobs under way still are).
    # On bench-vllm under heavy overload (JCTs ~20 s) the fill let new jobs with prompts up
    # to 4 of the 48 blocks pass longer ones until the queue drained (these finished
    # 1.2-1.7x later than under InferCept); this setting balances the two, but its effect on
    # the mean was within that host's run-to-run noise, so it is off. Simulator (GPT-J, 1,000
    # jobs): InferCept mix QPS 3, 4, σ = 1 and heavy-tail QPS 4.5 within 0.1 %; chat QPS 2
    # mean -0.4 %, p99 +0.9 %.
    new_jobs_wait_for_blocked: bool = False

    def quota(self, level: int) -> float:
        return self.quota_base * self.quota_growth**level


@dataclass(frozen=True)
class KvPolicyConfig:
    """Pressure-adaptive KV decisions during API waits (docs/design.md, "KV policy during API waits")."""

    # Below this KV utilisation every API wait preserves: free memory costs nobody anything,
    # and reclaim gives it back when a ready job wants it. 0.97 since reclaim and swap before
    # discard (0.9 before): heavy loads of the mix 1-5 % faster; from 0.985 chat's paused
    # conversations fill the pool (docs/results/tail-tuning.md, "The low-pressure threshold").
    low_pressure: float = 0.97
    # At or above this utilisation the preserve waste counts in full (InferCept's rule).
    high_pressure: float = 0.99
    # When a ready job does not fit, reclaim memory from jobs paused in API waits (swap if the
    # host has room and the predicted wait exceeds the swap round trip). It is what makes
    # preserving below `low_pressure` safe: memory kept while it was free is given back when
    # it is wanted. Neutral on the InferCept mix on GPT-J/A100 (docs/results/README.md, tuning); where
    # swaps are cheap next to tool calls it cuts mean JCT by 18 % (the small model on CPU).
    reclaim_for_ready_jobs: bool = True
    # Reclaim may also discard (recompute later) when swapping is impossible. Off by default:
    # under overload the GPU is the bottleneck, and recompute spends it.
    reclaim_discards: bool = False
    # When the weighted waste rule would discard at an API yield, swap instead if the host
    # has room and the predicted wait outlasts the round trip, even past the per-step swap
    # budget: the copy costs the PCIe link, a recompute costs the GPU, the bottleneck.
    swap_before_discard: bool = True
    # Keep at least this share of blocks free when admitting (vLLM's watermark, 1 %).
    watermark: float = 0.01
    # A KV copy to or from the host is *free* when other jobs run on the worker and it takes
    # at most this share of its engine step: a job swapped in that fast joins the next step
    # as a preserved one would (alone on an idle engine it would wait for its copy). Below
    # `low_pressure` a paused job is swapped rather than preserved when its copy is free (its
    # memory may serve a ready job, and it costs the job nothing), and the new-job gate
    # (`mlfq.new_job_kv_share`) does not hold a prompt whose room could be made by free
    # copies; a starving job's reserve (`mlfq.reserve_ratio`) is honoured only then. 0: never
    # free. The small model on CPU copies a context in ~8 % of a 7 ms step; GPT-J's
    # 1,500-token contexts take most of a step, long-context sessions seconds (swept
    # 0.05-1.0: docs/results/tiny-agent.md).
    free_copy_step_share: float = 0.1


@dataclass(frozen=True)
class PlasConfig:
    """Autellix's program-level attained service (PLAS)."""

    # Upper bounds of the queues in seconds of attained service (doubling, 7 queues + the rest).
    # (Swept: starting at 0.05, 0.25 and 1 s; 1 s served PLAS best on the InferCept mix.)
    boundaries_s: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    # Anti-starvation: promote to the top queue when waiting / service exceeds this.
    starvation_ratio: float = 8.0
    # Preempt lower-queue running calls to admit a higher-queue call that does not fit.
    # Off by default: measured on the InferCept mix it thrashes (docs/results/README.md), and the choice
    # left open by the paper is taken in the peer's favour.
    preemptive: bool = False


@dataclass(frozen=True)
class ContinuumConfig:
    """Continuum's KV time-to-live during tool calls."""

    # Memory held for τ seconds is priced as τ · (held share of the KV capacity) · this many
    # seconds of GPU time: the exchange rate between the benefit (time) and the cost (memory).
    # The paper gives no value; 0.01 was Continuum's best in a sweep of 0.001–1 (docs/results/README.md).
    memory_price_s: float = 0.01
    max_ttl_s: float = 60.0


@dataclass(frozen=True)
class ThunderAgentConfig:
    """ThunderAgent's program-level pause/resume loop, with the defaults of Dynamo's port."""

    tick_s: float = 5.0  # the control loop runs every tick: soft demote, resume, pause
    # Fractions of a worker's KV capacity held by the working set of its ACTIVE programs.
    pause_threshold: float = 0.95  # above it a pause cycle starts
    soft_demote_threshold: float = 0.80  # from here to the pause threshold: soft demote
    pause_target: float = 0.80  # a pause cycle pauses programs until the working set is here
    resume_hysteresis: float = 0.10  # resume only below pause_threshold − this, and up to it
    resume_timeout_s: float = 1800.0  # a program paused this long is resumed regardless
    resume_priority_boost_s: float = 1.0  # a resumed program's next request jumps ahead this much
    # A soft-demoted program's next request queues this much later. The port's default was
    # not in the text we could read; 5 s (one tick) is our choice.
    soft_demote_priority_jump_s: float = 5.0
    # ThunderAgent's optional optimistic resume: an ACTING program's context counts
    # 2^(−seconds since its tool call began) when the room to resume into is computed (the
    # pause check counts it in full). Off in the original's defaults; on here because it
    # favours the peer (heavy-tail, QPS 4: mean JCT 77 s with it, 113 s without).
    acting_token_decay: bool = True


@dataclass(frozen=True)
class MarsConfig:
    """MARS's agent admission window (AIMD) and agent-centric queues."""

    control_period_s: float = 1.0  # the admission window is adjusted once per period
    initial_window: int = 64  # agents admitted to execution at once, at start
    min_window: int = 8
    max_window: int = 4096
    additive_increase: int = 4  # agents per uncongested period while agents wait
    multiplicative_decrease: float = 0.5  # on congestion
    # A worker is congested when its KV use is at least this and admitted work is queued,
    # or when the engine preempted a running segment.
    congestion_utilization: float = 0.95
    # Agent-level feedback queues by attained service (seconds of GPU time), doubling.
    boundaries_s: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass(frozen=True)
class SchedulerConfig:
    mlfq: MlfqConfig = MlfqConfig()
    kv: KvPolicyConfig = KvPolicyConfig()
    plas: PlasConfig = PlasConfig()
    continuum: ContinuumConfig = ContinuumConfig()
    thunderagent: ThunderAgentConfig = ThunderAgentConfig()
    mars: MarsConfig = MarsConfig()
    # Batch size assumed when converting a decode token into token cost.
    nominal_batch_size: int = 32
    # A work-conserving fill stops after this many candidates in a row did not fit: the rest
    # are lower priority and the plan is rebuilt at the next event anyway.
    max_skipped_candidates: int = 64
    # Admit at most this many running segments per worker (0: the engine's max_num_seqs).
    # Fewer co-runners make each decode step shorter (the attention read grows with the
    # batch's context), so a priority order can finish short segments sooner.
    max_running_per_worker: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def changed(self) -> dict[str, object]:
        """The settings that differ from the defaults, as {"section.field": value}: what a
        log line or a report names."""
        out = {}
        default = SchedulerConfig()
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(default, f.name)
            if hasattr(mine, "__dataclass_fields__"):
                out.update({f"{f.name}.{g.name}": getattr(mine, g.name) for g in fields(mine)
                            if getattr(mine, g.name) != getattr(theirs, g.name)})
            elif mine != theirs:
                out[f.name] = mine
        return out

    @classmethod
    def from_settings(cls, items: list[str]) -> SchedulerConfig:
        """The defaults with the CLIs' `--set section.field=value` items applied; ValueError
        names an item that is malformed, unknown or of the wrong type."""
        return cls().with_overrides(parse_settings(items))

    def with_overrides(self, overrides: dict[str, str]) -> SchedulerConfig:
        """Apply `section.field=value` (or top-level `field=value`) overrides, e.g.
        {"mlfq.num_levels": "3"}."""
        cfg = self
        for key, raw in overrides.items():
            section, _, name = key.partition(".")
            if not name and section in {f.name for f in fields(cfg)} and not hasattr(
                    getattr(cfg, section), "__dataclass_fields__"):
                cfg = replace(cfg, **{section: _parse_like(getattr(cfg, section), raw, key)})
                continue
            sub = getattr(cfg, section, None)
            if sub is None or not name or name not in {f.name for f in fields(sub)}:
                raise ValueError(f"unknown scheduler setting {key!r}")
            current = getattr(sub, name)
            value = _parse_like(current, raw, key)
            cfg = replace(cfg, **{section: replace(sub, **{name: value})})
        return cfg


def parse_settings(items: list[str]) -> dict[str, str]:
    """`["mlfq.num_levels=3", ...]` (the `--set` flags of the CLIs) as overrides for
    `SchedulerConfig.with_overrides`; ValueError names an item without `=`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes section.field=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_like(current: object, raw: str, key: str) -> object:
    try:
        if isinstance(current, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            return tuple(float(x) for x in raw.split("/"))
    except ValueError:
        raise ValueError(f"bad value {raw!r} for {key}") from None
    raise ValueError(f"setting {key} cannot be overridden")
