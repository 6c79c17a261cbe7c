"""Token cost: the MLFQ's quantum, in prefill-token equivalents proportional to GPU time.

A prefill token adds the marginal per-token time of a step; a decode token adds its own token,
the read of its whole context, and its share of the step's fixed cost at a nominal batch size.
Both weights come from the profile's cost model, so a decode token of a 1,500-token context on
GPT-J-6B/A100 weighs about 19 prefill tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from astraea.profile import HardwareProfile


@dataclass(frozen=True)
class TokenCostModel:
    prefill_ms_per_token: float
    decode_fixed_ms: float  # per decode token: its token plus its share of the step's fixed cost
    decode_ms_per_context_token: float

    @classmethod
    def from_profile(cls, profile: HardwareProfile, nominal_batch_size: int = 32) -> TokenCostModel:
        a = profile.marginal_prefill_ms_per_token()
        share = profile.non_attention_ms(nominal_batch_size) / nominal_batch_size
        return cls(
            prefill_ms_per_token=a,
            decode_fixed_ms=share,
            decode_ms_per_context_token=profile.k_ms_per_context_token,
        )

    def cost(self, prefill_tokens: int, decode_tokens: int, context_tokens: int) -> float:
        """Token cost of a segment that prefilled, then decoded from `context_tokens` on."""
        mean_context = context_tokens + decode_tokens / 2.0
        decode_ms = decode_tokens * (
            self.decode_fixed_ms + self.decode_ms_per_context_token * mean_context
        )
        return prefill_tokens + decode_ms / self.prefill_ms_per_token

    def seconds(self, cost: float) -> float:
        """GPU seconds a token cost stands for."""
        return cost * self.prefill_ms_per_token / 1e3
