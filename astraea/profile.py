"""Hardware profiles: the calibrated GPU cost model, loaded from data files.

One profile per model × GPU, a JSON file in `astraea/profiles/` (or any path). A step of the
engine costs ``c + f(tokens processed) + k · context tokens read``, where ``f`` is linear
(``a · tokens``) or a piecewise-linear table of measured non-attention times, and ``k`` is the
KV bytes per token over the effective HBM bandwidth of decode attention. Every figure carries
its source in the file's ``sources`` object.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

BUILTIN_PROFILES = ("gptj-6b-a100", "vicuna-13b-2xa100", "llama3-8b-h100")


class ProfileError(ValueError):
    """A profile file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    model: str
    gpu: str
    # Non-attention step time: c + a·tokens, or a table of (tokens, ms) points.
    c_ms: float
    a_ms_per_token: float
    step_table: tuple[tuple[int, float], ...]  # empty → use c + a·tokens
    kv_bytes_per_token: int
    attention_bandwidth_bytes_per_s: float  # effective HBM bandwidth of decode attention
    gpu_memory_bytes: float
    gpu_memory_utilization: float
    weights_bytes: float
    swap_bandwidth_bytes_per_s: float  # host↔GPU, each direction
    host_swap_bytes: float
    context_window: int
    block_size: int = 16
    max_num_batched_tokens: int = 384
    max_num_seqs: int = 256
    sources: dict = field(default_factory=dict, compare=False)

    # --- memory -----------------------------------------------------------------------
    @property
    def kv_capacity_bytes(self) -> float:
        return self.gpu_memory_bytes * self.gpu_memory_utilization - self.weights_bytes

    @property
    def kv_capacity_blocks(self) -> int:
        return int(self.kv_capacity_bytes // (self.kv_bytes_per_token * self.block_size))

    @property
    def host_swap_blocks(self) -> int:
        return int(self.host_swap_bytes // (self.kv_bytes_per_token * self.block_size))

    # --- time -------------------------------------------------------------------------
    @property
    def k_ms_per_context_token(self) -> float:
        return self.kv_bytes_per_token / self.attention_bandwidth_bytes_per_s * 1e3

    @cached_property
    def _step_xs(self) -> list[int]:
        """The table's token counts, built once."""
        return [p[0] for p in self.step_table]

    @cached_property
    def _non_attention_memo(self) -> dict[int, float]:
        return {}

    def non_attention_ms(self, tokens: int) -> float:
        """Step time without attention, memoized: the simulator asks at every engine step,
        for token counts bounded by the step budget."""
        memo = self._non_attention_memo
        ms = memo.get(tokens)
        if ms is None:
            ms = memo[tokens] = self._non_attention_ms(tokens)
        return ms

    def _non_attention_ms(self, tokens: int) -> float:
        if not self.step_table:
            return self.c_ms + self.a_ms_per_token * tokens
        xs = self._step_xs
        i = bisect.bisect_left(xs, tokens)
        if i == 0:
            return self.step_table[0][1]
        if i == len(xs):  # extrapolate with the last segment's slope
            (x0, y0), (x1, y1) = self.step_table[-2], self.step_table[-1]
        else:
            (x0, y0), (x1, y1) = self.step_table[i - 1], self.step_table[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def step_time_s(self, tokens: int, context_tokens_read: int) -> float:
        """Duration of one engine step processing `tokens` and reading that much KV."""
        return (
            self.non_attention_ms(tokens) + self.k_ms_per_context_token * context_tokens_read
        ) / 1e3

    def prefill_time_s(self, tokens: int, prior_context: int = 0) -> float:
        """Time to prefill `tokens` alone, in chunks of the step token budget."""
        if tokens <= 0:
            return 0.0
        budget = self.max_num_batched_tokens
        full, rest = divmod(tokens, budget)
        t = full * self.non_attention_ms(budget) + (self.non_attention_ms(rest) if rest else 0.0)
        t += self.k_ms_per_context_token * prior_context * (full + (1 if rest else 0))
        return t / 1e3

    def marginal_decode_ms(self, context_tokens: int) -> float:
        """Extra step time one decoding sequence adds to a batch (its token and its KV read)."""
        slope = (self.non_attention_ms(257) - self.non_attention_ms(1)) / 256
        return slope + self.k_ms_per_context_token * context_tokens

    def marginal_prefill_ms_per_token(self) -> float:
        budget = self.max_num_batched_tokens
        return (self.non_attention_ms(budget) - self.non_attention_ms(1)) / max(budget - 1, 1)

    def swap_time_s(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.swap_bandwidth_bytes_per_s

    # --- loading ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, origin: str = "<dict>") -> HardwareProfile:
        try:
            step = data["step_time"]
            if step["kind"] == "linear":
                c_ms, a_ms, table = float(step["c_ms"]), float(step["a_ms_per_token"]), ()
            elif step["kind"] == "table":
                table = tuple((int(t), float(ms)) for t, ms in step["points_tokens_ms"])
                if len(table) < 2 or any(b[0] <= a[0] for a, b in zip(table, table[1:])):
                    raise ProfileError(
                        f"{origin}: step_time.points_tokens_ms needs two or more points "
                        "with increasing token counts"
                    )
                c_ms, a_ms = table[0][1], 0.0
            else:
                raise ProfileError(f"{origin}: step_time.kind must be 'linear' or 'table'")
            prof = cls(
                name=str(data["name"]),
                model=str(data["model"]),
                gpu=str(data["gpu"]),
                c_ms=c_ms,
                a_ms_per_token=a_ms,
                step_table=table,
                kv_bytes_per_token=int(data["kv_bytes_per_token"]),
                attention_bandwidth_bytes_per_s=float(data["attention_bandwidth_bytes_per_s"]),
                gpu_memory_bytes=float(data["gpu_memory_bytes"]),
                gpu_memory_utilization=float(data["gpu_memory_utilization"]),
                weights_bytes=float(data["weights_bytes"]),
                swap_bandwidth_bytes_per_s=float(data["swap_bandwidth_bytes_per_s"]),
                host_swap_bytes=float(data["host_swap_bytes"]),
                context_window=int(data["context_window"]),
                block_size=int(data.get("block_size", 16)),
                max_num_batched_tokens=int(data.get("max_num_batched_tokens", 384)),
                max_num_seqs=int(data.get("max_num_seqs", 256)),
                sources=dict(data.get("sources", {})),
            )
        except KeyError as e:
            raise ProfileError(f"{origin}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ProfileError):
                raise
            raise ProfileError(f"{origin}: bad value: {e}") from None
        positive = {
            "kv_bytes_per_token": prof.kv_bytes_per_token, "block_size": prof.block_size,
            "attention_bandwidth_bytes_per_s": prof.attention_bandwidth_bytes_per_s,
            "swap_bandwidth_bytes_per_s": prof.swap_bandwidth_bytes_per_s,
            "gpu_memory_bytes": prof.gpu_memory_bytes, "context_window": prof.context_window,
            "max_num_batched_tokens": prof.max_num_batched_tokens,
            "max_num_seqs": prof.max_num_seqs,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ProfileError(f"{origin}: {key} must be positive, got {value}")
        if not 0 < prof.gpu_memory_utilization <= 1:
            raise ProfileError(f"{origin}: gpu_memory_utilization must be in (0, 1]")
        if prof.host_swap_bytes < 0 or prof.weights_bytes < 0 or prof.c_ms < 0 or prof.a_ms_per_token < 0:
            raise ProfileError(f"{origin}: sizes and times must not be negative")
        if prof.kv_capacity_blocks <= 0:
            raise ProfileError(f"{origin}: no KV capacity left after the weights")
        if not prof.marginal_prefill_ms_per_token() > 0:
            # The token cost (the MLFQ's quantum) is counted in prefill-token equivalents.
            budget = prof.max_num_batched_tokens
            raise ProfileError(
                f"{origin}: step time must grow with the tokens in a step; it is "
                f"{prof.non_attention_ms(budget):.4g} ms at {budget} tokens (the step budget) "
                f"and {prof.non_attention_ms(1):.4g} ms at 1 token"
            )
        if prof.max_num_seqs > prof.max_num_batched_tokens:
            # Every running sequence must be able to decode in every step.
            raise ProfileError(f"{origin}: max_num_seqs must not exceed max_num_batched_tokens")
        return prof


def load_profile(name_or_path: str) -> HardwareProfile:
    """Load a built-in profile by name, or a profile JSON file by path."""
    data, origin = load_profile_data(name_or_path)
    return HardwareProfile.from_dict(data, origin)


def load_profile_data(name_or_path: str) -> tuple[dict, str]:
    """The JSON object of a built-in profile or a profile file, and where it came from."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ProfileError(f"profile file not found: {path}")
        text, origin = path.read_text(), str(path)
    elif name_or_path in BUILTIN_PROFILES:
        res = resources.files("astraea.profiles").joinpath(f"{name_or_path}.json")
        text, origin = res.read_text(), f"{name_or_path}.json"
    else:
        raise ProfileError(
            f"unknown profile {name_or_path!r}; built-in: {', '.join(BUILTIN_PROFILES)}, "
            "or give a path to a profile JSON file"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{origin}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: a profile is a JSON object")
    return data, origin


# --- calibration against a live engine --------------------------------------------------------
def step_time_ratio(profile: HardwareProfile,
                    samples: Iterable[tuple[int, int, float]]) -> dict[str, float]:
    """Steps an engine timed, as (tokens, context tokens read, seconds), against `profile`'s
    price for each: {"total": measured sum / predicted sum, "median": the median step's
    ratio, "steps": how many}; {} without steps."""
    pairs = [(float(d), profile.step_time_s(int(t), int(c))) for t, c, d in samples]
    pairs = [(d, p) for d, p in pairs if p > 0]
    if not pairs:
        return {}
    ratios = sorted(d / p for d, p in pairs)
    return {"total": sum(d for d, _ in pairs) / sum(p for _, p in pairs),
            "median": ratios[len(ratios) // 2], "steps": float(len(pairs))}


def scale_step_time(data: dict, factor: float, note: str) -> dict:
    """A copy of the profile JSON `data` whose every step costs `factor` times as much (the
    non-attention time and the attention read alike), with `note` as its calibration
    source. Memory and swap figures are kept: a step-time factor says nothing about them."""
    if not factor > 0:
        raise ProfileError(f"a calibration factor must be positive, got {factor}")
    out = json.loads(json.dumps(data))
    step = out.get("step_time", {})
    if step.get("kind") == "linear":
        step["c_ms"] = float(step["c_ms"]) * factor
        step["a_ms_per_token"] = float(step["a_ms_per_token"]) * factor
    elif step.get("kind") == "table":
        step["points_tokens_ms"] = [[t, float(ms) * factor] for t, ms in step["points_tokens_ms"]]
    else:
        raise ProfileError("step_time.kind must be 'linear' or 'table'")
    out["attention_bandwidth_bytes_per_s"] = float(out["attention_bandwidth_bytes_per_s"]) / factor
    out.setdefault("sources", {})["calibration"] = note
    HardwareProfile.from_dict(out, "the calibrated profile")  # still a valid profile
    return out
