"""The demo's OpenAI part: a short agent written against the official `openai` SDK, unchanged,
talking to a live stack's gateway. It sends no session key: the gateway finds the session
by the prompt's prefix, so every turn after the first continues the same job, and
`usage.prompt_tokens_details.cached_tokens` shows the context the scheduler kept (preserved
or swapped during the tool call) instead of recomputing it.

The workers are simulated, so the model's replies are placeholder text; the agent's tool
(a weather lookup) is simulated too, by a short sleep.
"""

from __future__ import annotations

import time

WEATHER = {"Tokyo": "18 C, clear", "Paris": "11 C, rain", "Lima": "22 C, cloudy"}


def available() -> str | None:
    """None when the demo's OpenAI part can run, else what is missing."""
    try:
        import fastapi  # noqa: F401  (the gateway's server)
        import openai  # noqa: F401
        import transformers  # noqa: F401  (the gateway's chat template)
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[demo]')"
    return None


def run_agent(base_url: str, model: str, out=None, tool_s: float = 0.3) -> list[dict]:
    """Run the agent; print one line per turn to `out` (if given); return the turns' usage."""
    import openai

    turns = []
    messages = [{"role": "system", "content": "You are a travel assistant. Look up the "
                                              "weather of each city, then answer."},
                {"role": "user", "content": "Tokyo, Paris or Lima this week: where is it "
                                            "warmest?"}]
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60) as client:
        for i, city in enumerate([*WEATHER, None]):
            # The tool category names the API wait to come; the last turn closes the session.
            hint = ({"astraea": {"next_tool_category": "weather"}} if city
                    else {"nvext": {"session_control": {"action": "close"}}})
            reply = client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=16, temperature=0,
                extra_body=hint)
            done = reply.parse()
            usage = done.usage
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details \
                else 0
            turns.append({"turn": i + 1, "job": reply.headers.get("x-astraea-job-id"),
                          "prompt_tokens": usage.prompt_tokens, "cached_tokens": cached,
                          "completion_tokens": usage.completion_tokens})
            if out is not None:
                print(f"  turn {i + 1}: job {turns[-1]['job']}, prompt {usage.prompt_tokens} "
                      f"tokens, cached {cached}, recomputed {usage.prompt_tokens - cached}, "
                      f"generated {usage.completion_tokens}"
                      + (f"; then the agent looks up {city}" if city else "; the answer"),
                      file=out, flush=True)
            messages.append({"role": "assistant", "content": done.choices[0].message.content})
            if city is None:
                break
            time.sleep(tool_s)  # the tool call: the job's API wait
            messages.append({"role": "user", "content": f"weather({city}) = {WEATHER[city]}"})
    return turns
