"""The model's chat template, tokenizing and decoding, and tool calls found in generated text.

Messages are rendered with the tokenizer's own chat template (`apply_chat_template`, the
tokenizer read from the model's folder); a tokenizer without one gets `FALLBACK_TEMPLATE`:

    [<|tools|>\\n{tools as JSON}</s>\\n]
    <|role|>\\n{content}[<tool_call>{"name": ..., "arguments": ...}</tool_call>...]</s>\\n   per message
    <|assistant|>\\n                                                                        to generate

(`</s>` stands for the tokenizer's EOS token.) Prompts are tokenized without adding special
tokens: the template writes the ones it wants.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

FALLBACK_TEMPLATE = (
    "{% if tools %}<|tools|>\n{{ tools | tojson }}{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}{% endif %}"
    "{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ParsedToolCall:
    """One tool call the model wrote, in OpenAI's shape."""

    id: str
    name: str
    arguments: str  # JSON text

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str) -> tuple[str, list[ParsedToolCall]]:
    """(the text outside tool calls, the calls) of generated text, for the hermes-like layout
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. A block that is not such an
    object stays in the text."""
    calls: list[ParsedToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", {})
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(ParsedToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"],
                                    args if isinstance(args, str) else json.dumps(args)))
    kept.append(text[pos:])
    return "".join(kept).strip() if calls else text, calls


def parse_forced_call(text: str) -> list[ParsedToolCall]:
    """The call in text decoded under a tool call's schema (`{"name", "arguments"}`); empty
    when it is not one (a simulated worker ignores the schema)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return []
    args = obj.get("arguments", {})
    return [ParsedToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"],
                           args if isinstance(args, str) else json.dumps(args))]


def template_message(m) -> dict[str, Any]:
    """A request message as a chat template expects it: content as text, and tool-call
    arguments as an object when they are JSON (as Hugging Face templates expect)."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args: Any = json.loads(c.function.arguments)
            except ValueError:
                args = c.function.arguments
            calls.append({"id": c.id, "type": "function",
                          "function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    else:
        out["tool_calls"] = None
    return out


def _load_tokenizer(folder: str):
    """The folder's tokenizer. A `tokenizer.json` is loaded as a fast tokenizer directly:
    `AutoTokenizer` would import torch (through the model registry) only to pick the class,
    which makes the gateway start ~10 s slower and hold torch in memory for nothing. The
    gateway encodes without special tokens (the chat template places them), so the model
    class's own special-token handling does not matter."""
    import os

    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class ChatTokenizer:
    """The model's tokenizer and chat template."""

    def __init__(self, folder: str, template: str | None = None) -> None:
        self.tok = _load_tokenizer(folder)
        self.template = template or getattr(self.tok, "chat_template", None) \
            or FALLBACK_TEMPLATE
        self.vocab_size = len(self.tok)
        self._backend = getattr(self.tok, "backend_tokenizer", None)

    def render(self, messages: list[dict], tools: list[dict] | None,
               add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tools=tools, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """The ids of `text`; with `special`, plus what the tokenizer adds around a whole
        prompt (e.g. BOS), as vLLM tokenizes a text completion's prompt."""
        if not text:
            return []
        if self._backend is not None:  # the Rust tokenizer itself: the same ids, ~20x faster
            return self._backend.encode(text, add_special_tokens=special).ids
        return list(self.tok.encode(text, add_special_tokens=special))

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`. Ids outside the vocabulary (a simulated worker's placeholders) are
        decoded modulo its size, so a stack without a model still answers with text."""
        return self.tok.decode([i % self.vocab_size for i in ids],
                               skip_special_tokens=skip_special)

    def in_vocab(self, ids) -> bool:
        return all(i < self.vocab_size for i in ids)
