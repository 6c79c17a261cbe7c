"""Claude Code session logs (``~/.claude/projects/<project>/<session-id>.jsonl``) as jobs.

Each line is one JSON object; the ones that matter here have ``type`` ``user`` or
``assistant``, an ISO 8601 ``timestamp`` and a ``message`` in the Anthropic Messages shape
(``content``: a string or blocks ``text``, ``thinking``, ``tool_use`` {id, name, input},
``tool_result`` {tool_use_id, content}). Claude Code writes one line per content block of a
response, each repeating the response's ``message.id`` and ``message.usage`` (input_tokens,
cache_read_input_tokens, cache_creation_input_tokens, output_tokens): the lines of one id
are one model call. Other line types (summary, system, file-history-snapshot, progress ...)
are skipped, and so are ``isSidechain`` lines (a subagent's own conversation) and the
client's synthetic messages (model ``<synthetic>``, no model call behind them).

One session file is one job: arrival at its first timestamp, a segment per model call, and
between a call's last line and its last tool result, the tool call (the category of the
tool that returned last; several tools in one call are named ``A+B``).
"""

from __future__ import annotations

import json
from pathlib import Path

from astraea.workloads.converters.common import (
    Call,
    Options,
    build_job,
    estimate_tokens,
    parse_time,
    tool_category,
)
from astraea.workloads.trace import JobTrace, TraceError

SYNTHETIC_MODEL = "<synthetic>"


def _text_chars(content: object) -> int:
    """Characters of text in a message or tool-result content (a string or blocks)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        n = 0
        for block in content:
            if isinstance(block, dict):
                for key in ("text", "thinking"):
                    if isinstance(block.get(key), str):
                        n += len(block[key])
                if block.get("type") == "tool_use":
                    n += len(json.dumps(block.get("input", {})))
                if block.get("type") == "tool_result":
                    n += _text_chars(block.get("content"))
        return n
    return 0


def _int(usage: dict, key: str, where: str) -> int:
    v = usage.get(key, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TraceError(f"{where}: field 'message.usage.{key}' must be an integer >= 0, got {v!r}")
    return v


class _Call:
    """A response being read: its lines share one message id."""

    def __init__(self, msg_id: str, ready_s: float | None, user_chars: int,
                 result_chars: int) -> None:
        self.msg_id = msg_id
        self.ready_s, self.user_chars, self.result_chars = ready_s, user_chars, result_chars
        self.done_s: float | None = None
        self.output_tokens = 0
        self.output_chars = 0
        self.context: int | None = None
        self.tools: dict[str, str] = {}  # tool_use id -> name, in order
        self.results: dict[str, float] = {}  # tool_use id -> when its result came

    def to_call(self, cpt: float) -> Call:
        output = self.output_tokens or estimate_tokens(self.output_chars, cpt)
        name = category = None
        if self.tools:
            names = list(dict.fromkeys(self.tools.values()))
            name = "+".join(names)
            # The tool the agent waited for longest sets the category.
            last = max(self.results, key=self.results.get) if self.results else \
                next(iter(self.tools))
            category = tool_category(self.tools[last])
        return Call(output_tokens=output, context_tokens=self.context,
                    user_chars=self.user_chars, result_chars=self.result_chars,
                    ready_s=self.ready_s, done_s=self.done_s, tool_name=name,
                    tool_category=category)


def _lines(path: Path):
    """(line number, object) for each non-empty line; a last line cut short (the session
    still being written) is skipped, anything else malformed is an error naming the line."""
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):
                return
            raise TraceError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{path}:{i}: each line must be a JSON object")
        yield i, obj


def read_session(path: Path, opts: Options, notes: list[str]) -> JobTrace | None:
    """The job of one session file, or None (with a note) when it has no model call."""
    calls: list[_Call] = []
    session_id: str | None = None
    first_s: float | None = None
    pending_user = pending_results = 0
    pending_ready: float | None = None
    sidechain = 0
    for lineno, obj in _lines(path):
        kind = obj.get("type")
        if kind not in ("user", "assistant"):
            continue
        where = f"{path}:{lineno}"
        if obj.get("isSidechain") is True:
            sidechain += 1
            continue
        session_id = session_id or (obj.get("sessionId") if isinstance(obj.get("sessionId"), str)
                                    else None)
        ts = parse_time(obj.get("timestamp"), where)
        first_s = ts if first_s is None else min(first_s, ts)
        msg = obj.get("message")
        if not isinstance(msg, dict) or "content" not in msg:
            raise TraceError(f"{where}: a {kind} line needs 'message' with 'content'")
        content = msg["content"]
        if not isinstance(content, str | list):
            raise TraceError(f"{where}: field 'message.content' must be a string or a list")
        if kind == "user":
            blocks = [content] if isinstance(content, str) else content
            for block in blocks:
                if isinstance(block, str):
                    pending_user += len(block)
                elif isinstance(block, dict) and block.get("type") == "tool_result":
                    tid = block.get("tool_use_id")
                    if not isinstance(tid, str):
                        raise TraceError(f"{where}: a tool_result block needs 'tool_use_id'")
                    pending_results += _text_chars(block.get("content"))
                    for call in reversed(calls):  # usually the latest call's
                        if tid in call.tools:
                            call.results[tid] = ts
                            break
                elif isinstance(block, dict):
                    pending_user += _text_chars([block])
            pending_ready = ts
            continue
        if msg.get("model") == SYNTHETIC_MODEL:
            continue
        msg_id = msg.get("id") if isinstance(msg.get("id"), str) else f"line{lineno}"
        if not calls or calls[-1].msg_id != msg_id:
            calls.append(_Call(msg_id, pending_ready, pending_user, pending_results))
            pending_user = pending_results = 0
        call = calls[-1]
        call.done_s = ts
        usage = msg.get("usage")
        if usage is not None:
            if not isinstance(usage, dict):
                raise TraceError(f"{where}: field 'message.usage' must be an object")
            # Streaming writes partial counts first: the largest is the response's.
            call.output_tokens = max(call.output_tokens, _int(usage, "output_tokens", where))
            call.context = (_int(usage, "input_tokens", where)
                            + _int(usage, "cache_read_input_tokens", where)
                            + _int(usage, "cache_creation_input_tokens", where))
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    tid, name = block.get("id"), block.get("name")
                    if not isinstance(tid, str) or not isinstance(name, str) or not name:
                        raise TraceError(f"{where}: a tool_use block needs 'id' and 'name'")
                    call.tools[tid] = name
        call.output_chars += _text_chars(content)
    if sidechain:
        notes.append(f"{path.name}: {sidechain} subagent (isSidechain) lines skipped")
    if not calls:
        notes.append(f"{path}: no model calls, skipped")
        return None
    job_id = session_id or path.stem
    return build_job(job_id, [c.to_call(opts.chars_per_token) for c in calls], first_s, opts,
                     str(path))


def session_files(inputs: list[str]) -> list[Path]:
    """The files given, and every ``*.jsonl`` under a directory given (a project folder or
    all of ``~/.claude/projects``), subagent folders excluded."""
    out: list[Path] = []
    for text in inputs:
        p = Path(text).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*.jsonl") if "subagents" not in f.parts)
        elif p.is_file():
            out.append(p)
        else:
            raise TraceError(f"{p}: no such file or directory")
    if not out:
        raise TraceError(f"no session files (*.jsonl) in {', '.join(inputs)}")
    return out


def read_claude_code(inputs: list[str], opts: Options, notes: list[str]) -> list[JobTrace]:
    jobs = [read_session(p, opts, notes) for p in session_files(inputs)]
    return [j for j in jobs if j is not None]
