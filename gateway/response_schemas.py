"""The Responses API request body (`POST /v1/responses`), validated with pydantic, and its
translation into the Chat Completions request the gateway runs.

As for chat, unknown fields are refused by name and fields whose effect cannot be honoured
are accepted only at their neutral value. Input items: role messages (string or text-part
content), `function_call` items a client echoes back, and `function_call_output` items.
Fields an SDK adds when it echoes an output item back (`id`, `status`, `annotations`, ...)
are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import bad_request
from gateway.schemas import check_tool_choice, validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class TextPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # echoed output_text parts carry these
    logprobs: list[Any] | None = None


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) \
            else "".join(p.text for p in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    id: str | None = None
    status: str | None = None
    namespace: str | None = None
    caller: dict[str, Any] | None = None
    async_: bool | None = Field(default=None, alias="async")


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) \
            else "".join(p.text for p in self.output)


def _item_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("type", "message")  # an easy input message has no type
    return getattr(v, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind)]

# Location parts pydantic adds for union members and tags; they are no field of the body.
_NOT_FIELDS = frozenset({"message", "function_call", "function_call_output",
                         "list[TextPart]", "str"})


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # only the neutral value


class ResponsesRequest(_Strict):
    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    text: TextConfig | None = None
    session_id: str | None = None  # as in chat: names the session (job) to run on
    # Accepted, and only at their neutral value.
    truncation: Literal["disabled"] | None = None
    background: bool | None = None
    include: list[str] | None = None
    # Accepted and ignored: they change nothing a client can observe here.
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None

    @field_validator("background")
    @classmethod
    def _foreground(cls, v):
        if v:
            raise ValueError("background responses are not supported")
        return v

    @field_validator("include")
    @classmethod
    def _nothing_included(cls, v):
        if v:
            raise ValueError("no extra output can be included here")
        return v

    @model_validator(mode="after")
    def _tools_fit_the_choice(self):
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return self
        check_tool_choice([t.name for t in self.tools or []],
                          choice.name if isinstance(choice, NamedFunction) else None)
        return self

    def items(self) -> list:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


def parse(body: Any) -> ResponsesRequest:
    """The request in `body` (decoded JSON), or an ApiError naming what is wrong."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e, fields=ResponsesRequest.model_fields,
                               not_fields=_NOT_FIELDS) from None


def input_messages(req: ResponsesRequest, history: list[dict]) -> list[dict]:
    """The request's input items as Chat Completions messages after `history` (the stored
    conversation it continues): an assistant message and the function calls that follow it
    are one message, as chat writes them; every output answers a call made before it."""
    called = {c["id"] for m in history for c in m.get("tool_calls") or []}
    out: list[dict] = []
    for i, item in enumerate(req.items()):
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last["tool_calls"] = [*(last.get("tool_calls") or []), call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            called.add(item.call_id)
        else:
            if item.call_id not in called:
                raise bad_request(
                    f"input[{i}]: No tool call found for function call output with call_id "
                    f"{item.call_id!r}.", f"input[{i}].call_id", "invalid_value")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return out


def chat_body(req: ResponsesRequest, messages: list[dict], session_id: str | None) -> dict:
    """The Chat Completions request (as a body for `gateway.schemas.parse`) that runs `req`
    over `messages`."""
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.instructions:
        body["messages"] = [{"role": "system", "content": req.instructions}, *messages]
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(
            exclude={"type"}, exclude_none=True, by_alias=True)} for t in req.tools]
    choice = req.tool_choice
    if isinstance(choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    for ours, theirs in (("max_tokens", req.max_output_tokens), ("temperature", req.temperature),
                         ("top_p", req.top_p), ("session_id", session_id)):
        if theirs is not None:
            body[ours] = theirs
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type != "text":
        if isinstance(choice, NamedFunction) or choice == "required":
            raise bad_request("tool_choice: a forced tool call and text.format cannot be "
                              "combined (both constrain the output)", "tool_choice")
        if fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt.schema_ is None or not fmt.name:
            raise bad_request("text.format: type json_schema needs a name and a schema",
                              "text.format")
        else:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "schema": fmt.schema_}}
    return body
