"""The gateway's settings, fixed at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # generous for long agent transcripts
DEFAULT_SESSION_IDLE_S = 600.0
DEFAULT_RESPONSE_RETENTION_S = 30 * 86400.0  # stored Responses in the durable store (OpenAI: 30 days)


@dataclass(frozen=True)
class GatewayConfig:
    """What one gateway serves, and how."""

    model: str  # the model name clients pass as `model` (listed by /v1/models)
    tokenizer: str  # a local Hugging Face folder with the model's tokenizer
    # Accepted key -> its owner id (empty: no key needed, one owner ""). An owner's stored
    # Responses and sessions are invisible to every other owner.
    api_keys: Mapping[str, str] = field(default_factory=dict)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    session_idle_s: float = DEFAULT_SESSION_IDLE_S  # an idle session's job is ended after this
    # A chat template (Jinja) to use instead of the tokenizer's own; None: the tokenizer's,
    # or gateway.chat.FALLBACK_TEMPLATE when it has none.
    chat_template: str | None = None
    created_unix_s: int = 0  # the model's `created` in /v1/models
    # With a durable store (--state-dir / --database): how long a stored Response is kept.
    response_retention_s: float = DEFAULT_RESPONSE_RETENTION_S
