"""`astraea replay --http URL`: drive a trace through the OpenAI Chat Completions API.

Each job is one chat session (its id sent as `X-Session-ID`), each segment one request made
with the official `openai` SDK: the first carries a user message of the segment's prompt
tokens, each later one the assistant's reply as returned plus a user message of the tool's
result tokens. `max_tokens` is the segment's output, `temperature` 0, and the job's and the
segment's tool categories travel in the `astraea` extension object (`job_category`,
`next_tool_category`), so output lengths and the API wait that follows are learned under the
trace's categories, as in the gRPC replay. Tools are
simulated by sleeping their duration × `time_scale`; the last request asks the gateway to
close the session (`nvext.session_control`), which ends the job.

Message text is built from one word that is a single token of the gateway's tokenizer, and
the chat template's own tokens per message are subtracted, so each segment's new tokens are
the trace's (to within the template's framing of the reply). JCT is measured as the gRPC
replay measures it: from the job's scheduled arrival to its last response, in virtual seconds.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from astraea.profile import HardwareProfile
from astraea.tools.replay import ReplayResult, drive
from astraea.workloads.trace import JobTrace

SESSION_HEADER = "X-Session-ID"
FILLER_WORDS = (" a", " the", " x", " is", " to")  # candidates for a one-token word


class PromptText:
    """Text of a given number of the tokenizer's tokens, net of the chat template's framing."""

    def __init__(self, tokenizer_path: str, tokenizer=None) -> None:
        """`tokenizer`: the one at `tokenizer_path` already loaded (AutoTokenizer, else used,
        imports torch: tens of seconds on a busy host)."""
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.tok = tokenizer
        self.word = next((w for w in FILLER_WORDS if self._count(w * 8) == 8), None)
        if self.word is None:
            raise ValueError(f"{tokenizer_path}: none of {FILLER_WORDS} is one token; cannot "
                             "build prompts of exact lengths")
        # The template's tokens around a user message: of the first one (with the generation
        # prompt), and of one that follows an assistant reply.
        one = [{"role": "user", "content": self.word}]
        self.first_overhead = self._rendered(one) - 1
        two = [*one, {"role": "assistant", "content": self.word}]
        self.next_overhead = (self._rendered([*two, {"role": "user", "content": self.word}])
                              - self._rendered(two, gen=False) - 1)

    def _count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def _rendered(self, messages: list[dict], gen: bool = True) -> int:
        return len(self.tok.apply_chat_template(messages, tokenize=True,
                                                add_generation_prompt=gen, return_dict=False))

    def message(self, tokens: int, first: bool) -> str:
        """A user message's content whose rendering adds about `tokens` tokens (at least 1)."""
        overhead = self.first_overhead if first else self.next_overhead
        return self.word * max(1, tokens - overhead)


@dataclass
class HttpTarget:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str = "none"  # the gateway serves loopback without keys; the SDK wants one


def turn_body(job: JobTrace, i: int) -> dict:
    """The extra body of the request for segment `i` of `job`: the job's category (output
    lengths are learned per category, as the gRPC replay starts its jobs) and the tool's
    category for the API wait to come; the last segment, or one without a tool, closes the
    session."""
    seg = job.segments[i]
    hints = {"job_category": job.category}
    if seg.tool is not None:
        hints["next_tool_category"] = seg.tool.category
    body: dict = {"astraea": hints}
    if i == len(job.segments) - 1 or seg.tool is None:
        body["nvext"] = {"session_control": {"action": "close"}}
    return body


async def _run_job(client, target: HttpTarget, job: JobTrace, text: PromptText,
                   time_scale: float) -> None:
    session = f"replay-{job.job_id}-{uuid.uuid4().hex[:8]}"
    messages: list[dict] = []
    for i, seg in enumerate(job.segments):
        new = max(job.new_tokens_before(i), 1)
        messages.append({"role": "user", "content": text.message(new, first=i == 0)})
        done = await client.chat.completions.create(
            model=target.model, messages=messages, max_tokens=seg.output_tokens,
            temperature=0.0, extra_headers={SESSION_HEADER: session},
            extra_body=turn_body(job, i))
        got = done.usage.completion_tokens if done.usage else -1
        if got != seg.output_tokens:
            raise RuntimeError(f"segment {i}: {got} tokens, expected {seg.output_tokens}")
        messages.append({"role": "assistant", "content": done.choices[0].message.content})
        if seg.tool is None:
            return
        await asyncio.sleep(seg.tool.duration_s * time_scale)


async def replay_http(jobs: list[JobTrace], target: HttpTarget, tokenizer: str,
                      profile: HardwareProfile, time_scale: float = 1.0,
                      concurrency: int | None = None, log=None) -> ReplayResult:
    """Replay `jobs` through the gateway at `target`; the same result shape as the gRPC
    `replay` (astraea.tools.replay), so the same report prints both."""
    import httpx
    import openai

    text = PromptText(tokenizer)
    # One connection per job in flight: the SDK's default pool keeps only 100 alive.
    limits = httpx.Limits(max_connections=max(len(jobs), 1),
                          max_keepalive_connections=max(len(jobs), 1))
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=10.0))
    # The SDK's own retries (2, on connection errors, 429 and 5xx), as agents run it: a
    # keep-alive connection the server closed during a long tool wait is retried, not fatal.
    async with openai.AsyncOpenAI(base_url=target.base_url, api_key=target.api_key,
                                  http_client=http) as client:
        async def run(job: JobTrace) -> bool:
            try:
                await _run_job(client, target, job, text, time_scale)
            except Exception as e:
                raise RuntimeError(f"{type(e).__name__}: {e}") from e
            return False

        return await drive(jobs, profile, run, time_scale, concurrency, log)
