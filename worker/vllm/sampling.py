"""A segment's sampling as vLLM 0.32 `SamplingParams`, for requests that skip vLLM's front end.

`VllmEngine` hands requests straight to the engine core, so what vLLM's input processor would
do for a request is done here: EOS from the model's generation config, and the structured
output backend the engine was configured with. Stop strings are not vLLM's business at this
level (its front-end detokenizer handles them): the vLLM backend matches them in the
segment's text (`worker.vllm.detokenize.StopText`) and ends the segment itself.
"""

from __future__ import annotations

from worker.backend import Sampling

GREEDY = Sampling()

# The engine's structured-output setting. xgrammar runs on CPU; without whitespace between
# JSON tokens a small model cannot wander off into endless spaces and newlines.
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


def sampling_params(sampling: Sampling | None, max_tokens: int, logprobs: int | None,
                    generation_config: dict, eos_id: int | None):
    """vLLM `SamplingParams` for one admission of a segment (None: greedy)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    s = sampling or GREEDY
    structured = None
    if s.json_schema:
        structured = StructuredOutputsParams(json=s.json_schema)
        # What the input processor would set (sampling_params.py, _validate_structured_outputs);
        # the structured output manager builds its backend from it.
        structured._backend = STRUCTURED_OUTPUTS["backend"]
    params = SamplingParams(max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                            seed=s.seed, logprobs=logprobs, structured_outputs=structured)
    # Skipping vLLM's input processor skips this too; without it EOS would not stop a
    # segment (v1/engine/input_processor.py:489).
    params.update_from_generation_config(generation_config, eos_id)
    return params


def compile_grammar(request) -> str | None:
    """Wait for the compilation of a vLLM `Request`'s grammar (started by the engine core's
    `preprocess_add_request`); returns why it failed, or None (also: no grammar). Waiting
    means a schema xgrammar cannot compile refuses the admission, where the engine core
    would fail the request in a later step."""
    from concurrent.futures import Future

    so = request.structured_output_request
    if so is None or not isinstance(so._grammar, Future):
        return None
    try:
        so.grammar = so._grammar.result()
    except Exception as exc:  # noqa: BLE001 - the grammar backends raise various errors
        return f"json_schema does not compile: {type(exc).__name__}: {exc}"
    return None


def eos_settings(model_config) -> tuple[dict, int | None]:
    """The model's generation config and EOS id, as vLLM's input processor reads them."""
    eos = getattr(model_config.hf_config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return model_config.try_get_generation_config(), eos


def seed_of(sampling: Sampling | None) -> int | None:
    """The seed vLLM gives a request its own generator for: only a seeded random one
    (SamplingType.RANDOM_SEED; greedy ignores the seed)."""
    from vllm.sampling_params import _SAMPLING_EPS

    s = sampling or GREEDY
    return s.seed if s.seed is not None and s.temperature >= _SAMPLING_EPS else None
