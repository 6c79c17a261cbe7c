"""The Chat Completions request body, validated with pydantic.

Unknown fields are refused by name. A few documented OpenAI fields that change nothing here
are accepted and ignored (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`);
fields whose effect cannot be honoured are accepted only at their neutral value
(`n` 1, penalties 0, `logprobs` false, an empty `logit_bias`), so a request never silently
gets something other than what it asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ApiError, bad_request


class _Strict(BaseModel):
    # strict: "yes" is not a boolean, nor 1 a string (an int still passes as a float).
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # echoed back by SDKs on assistant messages

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class AgentContext(BaseModel):
    model_config = ConfigDict(extra="allow")  # vendor fields we do not use are harmless
    session_id: str | None = None
    trajectory_id: str | None = None


class SessionControl(_Strict):
    action: Literal["close", "keep"]


class AgentHints(BaseModel):
    model_config = ConfigDict(extra="allow")  # Dynamo's other hints: harmless, not used
    osl: Annotated[int, Field(ge=1)] | None = None  # expected output length, in tokens


class NvExt(BaseModel):
    model_config = ConfigDict(extra="allow")  # other hints: read by later steps, ignored now
    agent_context: AgentContext | None = None
    session_control: SessionControl | None = None
    agent_hints: AgentHints | None = None


class AstraeaHints(_Strict):
    """The `astraea` extension object: what the client knows about the call its reply leads
    to. The category names the API wait the scheduler and the predictor learn under (instead
    of the called function's name, or "human")."""
    next_tool_category: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    # The kind of agent (the job's category: output lengths are learned per category); read
    # when the request starts a job. None: "chat".
    job_category: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    # How long the client expects that call to take: replaces the predictor's estimate.
    expected_tool_s: Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)] | None = None


def check_tool_choice(tool_names: list[str], named: str | None) -> None:
    """A tool_choice that forces a call ('required', or `named`) needs tools, and the named
    one among them; raises the ValueError pydantic reports as a 400 on tool_choice."""
    if not tool_names:
        raise ValueError("tool_choice: 'required' or a named function needs tools")
    if named is not None and named not in tool_names:
        raise ValueError(f"tool_choice: no tool named {named!r} in tools")


class NeutralPenalties(_Strict):
    """Sampling penalties both completion APIs accept only at their neutral value."""
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v not in (None, 0, 0.0):
            raise ValueError("penalties are not supported: send 0 or leave it out")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v


class ChatRequest(NeutralPenalties):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    session_id: str | None = None
    nvext: NvExt | None = None
    astraea: AstraeaHints | None = None
    # Accepted, and only at their neutral value.
    logprobs: bool | None = None
    # Accepted and ignored: they change nothing a client can observe here.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported: each request is one segment of a session")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @model_validator(mode="after")
    def _tools_fit_the_choice(self):
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return self
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        check_tool_choice([t.function.name for t in self.tools or []], named)
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError("tool_choice: a forced tool call and response_format cannot be "
                             "combined (both constrain the output)")
        return self

    def forced_tools(self) -> list[Tool]:
        """The tools one of which the output must call (empty: no call is forced)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == choice.function.name]
        return list(self.tools or []) if choice == "required" else []

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(e: ValidationError | list[dict], fields: dict | None = None,
                     not_fields: frozenset[str] = frozenset()) -> ApiError:
    """The first problem pydantic found, as a 400 naming the field. `fields`: the request's
    top-level fields (a check across fields names one in its message); `not_fields`: more
    location parts that name no field (union tags)."""
    errors = e.errors() if isinstance(e, ValidationError) else e
    # A value that fits no member of a union fails once per member: the deepest failure (the
    # member that came closest) says best what is wrong; the later one on ties.
    first = max(reversed(errors), key=lambda err: len(err.get("loc", ())))
    loc = tuple(p for p in first.get("loc", ()) if p != "body")
    # Union members add their type name to the location; drop those.
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in (
        "str", "list[TextPart]", "list[str]", "int", "float") or p in not_fields)))
    param = _param(loc) or None
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param,
                           "unknown_parameter")
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    field, sep, _ = msg.partition(":")
    if param is None and sep and field in (ChatRequest.model_fields if fields is None
                                           else fields):
        param, msg = field, msg[len(field) + 1:].strip()  # a check across fields names it
    return bad_request(f"Invalid value for {param!r}: {msg}." if param else msg, param,
                       "invalid_value")


def parse(body: Any) -> ChatRequest:
    """The request in `body` (decoded JSON), or an ApiError naming what is wrong."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def check_tool_messages(messages: list[Message]) -> None:
    """Every tool message answers a call made by an earlier assistant message."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.tool_calls:
            called.update(c.id for c in m.tool_calls)
        if m.role == "tool":
            if not m.tool_call_id:
                raise bad_request(f"messages[{i}]: a tool message needs tool_call_id",
                                  f"messages[{i}].tool_call_id", "invalid_value")
            if m.tool_call_id not in called:
                raise bad_request(
                    f"messages[{i}]: tool_call_id {m.tool_call_id!r} answers no tool call of "
                    "an earlier assistant message", f"messages[{i}].tool_call_id",
                    "invalid_value")


__all__ = ["ChatRequest", "Message", "ApiError", "parse", "check_tool_messages",
           "validation_error"]
