"""A tiny Llama built from nothing, for tests and the default demo; cached on disk.

* Tokenizer: byte-level BPE trained here with `tokenizers` on the built-in corpus below,
  vocab 512, `<s>` (id 0) and `</s>` (id 1); saved as a `PreTrainedTokenizerFast` with bos,
  eos and pad (= eos), and a post-processor that adds `<s>`; with a chat template
  (`CHAT_TEMPLATE`), so `apply_chat_template` and vLLM's OpenAI server take chat messages.
* Model: `transformers.LlamaForCausalLM`, 2 layers, hidden 128, 4 heads, 2 KV heads
  (head_dim 32: vLLM's CPU attention has no kernel for head_dim 16,
  vllm/v1/attention/backends/cpu_attn.py:69), random weights from a fixed seed.
* Cache: `<cache>/tiny-llama-<hash of the recipe>`, built in a temp folder and renamed into
  place, so a reader never sees half a model. Rebuilds are byte-identical.

Importing this module is cheap: torch, transformers and tokenizers are imported only when a
model has to be built. Any local Hugging Face model folder can be used in its place.

    python -m worker.vllm.tiny_model [cache_dir [size]]     # prints the folder
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

BUILD_VERSION = 2  # bump when the recipe changes, so old caches are not reused (2: chat template)

# The chat template saved with the tokenizer, in a Hermes-like layout: turns marked
# <|system|>, <|user|>, <|assistant|>, <|tool|>, each ended by the EOS token (so a reply ends
# where the model stops); the tools listed in the system turn as JSON, one per line (name,
# description if any, parameters: the same text whoever fills in absent fields); a tool
# call as <tool_call>{"name": ..., "arguments": {...}}</tool_call>; a tool's result as
# <tool_response>...</tool_response> in a tool turn. The markers are plain text to this
# tokenizer (no new tokens, so the model is unchanged). The prompt starts with BOS itself:
# chat prompts are tokenized without special tokens.
CHAT_TEMPLATE = """\
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content -%}{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set system = messages[0] if messages and messages[0].role == 'system' else none -%}
{%- if system is not none or tools -%}
<|system|>
{% if system is not none %}{{ text(system.content) }}
{% endif -%}
{%- if tools -%}
You can call these tools. To call one, answer with \
<tool_call>{"name": <tool name>, "arguments": <arguments object>}</tool_call>
<tools>
{% for tool in tools -%}
{%- set f = tool.function if tool.function is defined else tool -%}
{"name": {{ f.name | tojson }}
{%- if f.description %}, "description": {{ f.description | tojson }}{% endif -%}
, "parameters": {{ (f.parameters if f.parameters is defined and f.parameters is not none \
else {}) | tojson }}}
{% endfor -%}
</tools>
{% endif -%}
{{ eos_token }}
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{%- if not loop.first %}<|system|>
{{ text(message.content) }}{{ eos_token }}
{% endif -%}
{%- elif message.role == 'user' -%}
<|user|>
{{ text(message.content) }}{{ eos_token }}
{% elif message.role == 'assistant' -%}
<|assistant|>
{{ text(message.content) }}
{%- for call in message.tool_calls or [] -%}
{%- set f = call.function if call.function is defined else call -%}
<tool_call>{"name": {{ f.name | tojson }}, "arguments": \
{{ f.arguments if f.arguments is string else f.arguments | tojson }}}</tool_call>
{%- endfor -%}
{{ eos_token }}
{% elif message.role == 'tool' -%}
<|tool|>
<tool_response>{{ text(message.content) }}</tool_response>{{ eos_token }}
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{% endif -%}
"""

PARAMS: dict = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "seed": 1234,
    # The output layer is multiplied by this. It does not make greedy decoding more robust
    # to rounding (the noise scales with it); it only makes the logits look less flat.
    "lm_head_scale": 8.0,
}

# Model sizes, by name. "tiny" is for tests and the demo (prefills 1,024 tokens in about 10 ms
# on two CPU cores: recompute is nearly free). "small" is for benchmarks where the KV policy
# has something to save: about 17 M parameters, so a recompute of a few hundred tokens costs
# as much as a short tool call on the same cores. Same tokenizer and recipe otherwise.
SIZES: dict[str, dict] = {
    "tiny": PARAMS,
    "small": {**PARAMS, "hidden_size": 512, "intermediate_size": 1536,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4},
}

_SENTENCES = """\
An agent reads its task, makes a short plan and then asks a tool for the facts it lacks.
When the tool answers, the agent reads the answer and decides what to do next.
Some tools answer at once, while others take several seconds to return a result.
While a job waits for a tool, its memory can stay where it is, move to the host, or go.
Keeping the memory costs space; moving it costs copy time; dropping it costs recompute.
A good scheduler weighs these costs for every job that pauses.
Short jobs should finish first, so that many people get their answers quickly.
A long job is moved down to a lower queue after it has used its share of time.
The engine runs in steps, and each step works on a batch of several requests.
In one step the engine may read a long prompt or add one token to each running answer.
Memory for the cache is cut into blocks, and every block holds a fixed number of tokens.
When the blocks run out, some request has to give its blocks back and wait.
The weather today is mild, with a light wind from the west and some clouds in the evening.
My neighbour grows tomatoes, beans and small yellow flowers in her garden.
The train left the station at nine and reached the coast a little before noon.
We walked along the river, counted the boats and talked about the week ahead.
The library opens early on weekdays and closes late on the first Friday of each month.
She wrote the numbers one, two, three, four and five on the board, then added them up.
Ten plus twenty is thirty, and thirty times two is sixty.
The cat slept on the warm windowsill while the rain tapped softly on the glass.
He asked a simple question and got a long answer that did not help at all.
Please find the total cost of the order and send it back in a short message.
The report lists every step, how long it took and how much memory it used.
If the answer looks wrong, check the input first and the arithmetic second.
A careful reader notes each claim, looks for its source and keeps what holds up.
The small model in this project knows nothing; it only has to be the same every time.
"""
CORPUS = _SENTENCES * 3  # repeated so the pair counts favour real words in the merges


def default_cache_dir() -> Path:
    """`$ASTRAEA_MODEL_CACHE`, or `~/.cache/astraea/models`."""
    env = os.environ.get("ASTRAEA_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "astraea" / "models"


def _recipe_hash(params: dict) -> str:
    blob = json.dumps({"v": BUILD_VERSION, "corpus": CORPUS, "chat_template": CHAT_TEMPLATE,
                       **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached(size: str, cache_dir) -> tuple[dict, Path]:
    """(the recipe's parameters, the model's folder in the cache)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: one of {', '.join(SIZES)}")
    params = SIZES[size]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return params, root / f"{size}-llama-{_recipe_hash(params)}"


def _build_once(out: Path, build, params: dict) -> Path:
    """`out`, built by `build(folder, params)` in a temp folder renamed into place, so a
    reader never sees half of it; a concurrent builder that wins the race is fine."""
    if (out / ".complete").exists():
        return out
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp, params)
        (tmp / ".complete").write_text("ok\n")
        tmp.rename(out)  # atomic on one file system
    except OSError:
        if not (out / ".complete").exists():  # not a concurrent builder winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_model(cache_dir: str | os.PathLike | None = None, size: str = "tiny") -> Path:
    """The folder of the model of `size` (see SIZES), built on the first call for this recipe
    and cache."""
    params, out = _cached(size, cache_dir)
    return _build_once(out, _build, params)


def build_tiny_tokenizer(cache_dir: str | os.PathLike | None = None,
                         size: str = "tiny") -> Path:
    """The folder of the tokenizer of the model of `size` alone (files identical to the
    model's), for a gateway in front of simulated workers: built without torch, in seconds.
    The full model's folder is returned instead when it is already built."""
    params, model = _cached(size, cache_dir)
    if (model / ".complete").exists():
        return model
    return _build_once(model.with_name(model.name + "-tokenizer"), _build_tokenizer, params)


def resolve_tokenizer(name_or_folder: str | None) -> str:
    """Like `resolve_model`, for what needs only the tokenizer and chat template."""
    if name_or_folder is None or name_or_folder in SIZES:
        return str(build_tiny_tokenizer(size=name_or_folder or "tiny"))
    return name_or_folder


def resolve_model(name_or_folder: str | None) -> str:
    """A model argument as a folder: None or a size name ("tiny", "small") builds that model
    (cached); anything else is taken as a local Hugging Face model folder."""
    if name_or_folder is None or name_or_folder in SIZES:
        return str(build_tiny_model(size=name_or_folder or "tiny"))
    return name_or_folder


def _build_tokenizer(folder: Path, params: dict):
    """Train and save the tokenizer (no torch: the gateway of a stack without a model needs
    only this)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params["vocab_size"], special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.model_max_length = params["max_position_embeddings"]
    fast.chat_template = CHAT_TEMPLATE
    # In tokenizer_config.json (not chat_template.jinja), where every loader looks.
    fast.save_pretrained(folder, save_jinja_files=False)
    return fast


def _build(folder: Path, params: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = _build_tokenizer(folder, params)
    bos_id, eos_id = fast.bos_token_id, fast.eos_token_id

    torch.manual_seed(params["seed"])
    config = LlamaConfig(
        vocab_size=len(fast),  # BPE may stop short of vocab_size on a small corpus
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["num_hidden_layers"],
        num_attention_heads=params["num_attention_heads"],
        num_key_value_heads=params["num_key_value_heads"],
        max_position_embeddings=params["max_position_embeddings"],
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(params["lm_head_scale"])
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "astraea_build.json").write_text(json.dumps(params, indent=1, sort_keys=True))


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else None,
                           sys.argv[2] if len(sys.argv) > 2 else "tiny"))
