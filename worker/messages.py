"""The worker's side of the `WorkerService.Connect` stream as data: a plan's Admit as the
backend's `SegmentInput`, and the backend's events as the stream's messages, batched."""

from __future__ import annotations

from dataclasses import dataclass

from astraea import wire
from astraea.v1 import common_pb2, worker_pb2
from worker.backend import (
    MemoryChanged,
    Sampling,
    SegmentEnded,
    SegmentInput,
    SegmentPreempted,
    StepTiming,
    TokensGenerated,
)

# A backend's own finish reason; None (a length-ended segment) leaves it UNSPECIFIED, and the
# control plane decides TOOL_CALL or LENGTH from the client's next_tool_category hint.
_FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP,
                   "length": common_pb2.FINISH_REASON_LENGTH,
                   "tool_call": common_pb2.FINISH_REASON_TOOL_CALL}


@dataclass(frozen=True)
class AdmitRefused:
    """Queued by the worker itself (not a backend event) when the backend refused an Admit;
    it goes out in order with the job's backend events."""

    job_id: str
    reason: str
    retryable: bool


def segment_input(a: worker_pb2.Admit) -> SegmentInput:
    # The Admit carries what is left of the segment's budget (`max_tokens`) and the whole
    # budget (`sampling.max_tokens`); their difference is where this admission starts.
    budget = a.sampling.max_tokens if a.sampling.HasField("max_tokens") else 0
    max_tokens = a.max_tokens or budget
    ids = tuple(a.prompt_token_ids.ids) if a.WhichOneof("prompt") == "prompt_token_ids" else None
    text = a.prompt_text if a.WhichOneof("prompt") == "prompt_text" else None
    context = tuple(p.text if p.WhichOneof("piece") == "text" else tuple(p.token_ids.ids)
                    for p in a.context) or None
    return SegmentInput(max_tokens=max_tokens, first_index=max(budget - max_tokens, 0),
                        prompt_token_ids=ids, prompt_text=text, context=context,
                        sampling=_sampling(a.sampling))


def _sampling(p: common_pb2.SamplingParams) -> Sampling:
    # The control plane fills temperature and top_p in; a field still unset (a worker driven
    # without it) keeps the greedy default of `Sampling`.
    return Sampling(temperature=p.temperature if p.HasField("temperature") else 0.0,
                    top_p=p.top_p if p.HasField("top_p") else 1.0,
                    seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop),
                    json_schema=p.json_schema or None)


def to_messages(items: list, worker_id: int,
                 memory: worker_pb2.MemoryReport | None = None) -> list[worker_pb2.WorkerMessage]:
    """Backend events (in order) as stream messages, batched. `memory`, if given, replaces
    the MemoryChanged views and goes first: it is the memory as of now (after every event of
    the batch), so the KV decisions the control plane takes on the segment ends that follow
    see it rather than the previous report."""
    out: list[worker_pb2.WorkerMessage] = []
    if memory is not None and any(isinstance(e, MemoryChanged) for e in items):
        out.append(worker_pb2.WorkerMessage(memory=memory))
    tokens: dict[str, worker_pb2.JobTokens] = {}
    steps: list[common_pb2.StepTiming] = []
    last_memory = max((i for i, e in enumerate(items) if isinstance(e, MemoryChanged)), default=-1)

    def flush_tokens() -> None:
        if tokens:
            out.append(worker_pb2.WorkerMessage(
                tokens=worker_pb2.TokenBatch(jobs=list(tokens.values()))))
            tokens.clear()

    for i, ev in enumerate(items):
        if isinstance(ev, TokensGenerated):
            jt = tokens.get(ev.job_id)
            if jt is not None and jt.first_index + len(jt.token_ids) != ev.first_index:
                flush_tokens()
                jt = None
            if jt is None:
                tokens[ev.job_id] = worker_pb2.JobTokens(
                    job_id=ev.job_id, first_index=ev.first_index, token_ids=ev.token_ids,
                    text=ev.text)
            else:
                jt.token_ids.extend(ev.token_ids)
                jt.text += ev.text
        elif isinstance(ev, StepTiming):
            steps.append(common_pb2.StepTiming(tokens=ev.tokens,
                                               context_tokens_read=ev.context_tokens_read,
                                               duration_s=ev.duration_s))
        elif isinstance(ev, MemoryChanged):
            if i == last_memory and memory is None:
                flush_tokens()
                out.append(worker_pb2.WorkerMessage(memory=wire.worker_view_to_proto(ev.view)))
        elif isinstance(ev, SegmentEnded):
            flush_tokens()
            out.append(worker_pb2.WorkerMessage(segment_ended=worker_pb2.SegmentEnded(
                job_id=ev.job_id, generated_tokens=ev.generated_tokens,
                prefill_tokens=ev.prefill_tokens, ttft_s=ev.ttft_s, duration_s=ev.duration_s,
                finish_reason=_FINISH_REASONS.get(ev.finish_reason,
                                                  common_pb2.FINISH_REASON_UNSPECIFIED))))
        elif isinstance(ev, SegmentPreempted):
            flush_tokens()
            out.append(worker_pb2.WorkerMessage(preempted=worker_pb2.Preempted(
                job_id=ev.job_id, generated_tokens=ev.generated_tokens,
                action=wire.kv_action_to_proto(ev.action))))
        elif isinstance(ev, AdmitRefused):
            flush_tokens()
            out.append(worker_pb2.WorkerMessage(admit_refused=worker_pb2.AdmitRefused(
                job_id=ev.job_id, reason=ev.reason, retryable=ev.retryable)))
    flush_tokens()
    if steps:
        out.append(worker_pb2.WorkerMessage(step_report=worker_pb2.StepReport(steps=steps)))
    return out


def bundled(msgs: list[worker_pb2.WorkerMessage],
            max_bytes: int) -> list[worker_pb2.WorkerMessage]:
    """`msgs` as few writes: runs of them in one Bundle each, every write at most `max_bytes`
    (a message too large alone goes alone, and the stream refuses it as it would anyway)."""
    if len(msgs) < 2:
        return msgs
    out: list[worker_pb2.WorkerMessage] = []
    run: list[worker_pb2.WorkerMessage] = []
    size = 0
    for msg in msgs:
        n = msg.ByteSize() + 8  # the field's tag and length, with room to spare
        if run and size + n > max_bytes:
            out.append(_one(run))
            run, size = [], 0
        run.append(msg)
        size += n
    if run:
        out.append(_one(run))
    return out


def _one(run: list[worker_pb2.WorkerMessage]) -> worker_pb2.WorkerMessage:
    if len(run) == 1:
        return run[0]
    return worker_pb2.WorkerMessage(bundle=worker_pb2.Bundle(messages=run))
