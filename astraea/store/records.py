"""What the durable store keeps: one frozen dataclass per record, and their checks.

Records are validated in the caller's thread, before a write is queued: a batched write runs
later on the writer thread, where an error could no longer reach the call that caused it (and
on PostgreSQL would abort the whole batch), so every write that is queued must be one the
database accepts.
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_ID_CHARS = 1024  # job, owner, response and blob names; the services' own limits are lower


class StoreError(RuntimeError):
    """The store cannot be opened or used: a bad URL, an unreachable database, a database
    written by another schema version, or a failed write (the store is then unusable)."""


class SchemaVersionError(StoreError):
    """The database was written by a build with another schema version."""


@dataclass(frozen=True)
class JobRecord:
    """One job as the control plane accepted it, and where it stands."""

    job_id: str
    owner: str  # id of the API key that started it ("" where calls are not authenticated)
    category: str
    arrival_unix_s: float
    state: str = "arrived"  # astraea.plan.JobState value
    segment_index: int = 0  # segments ended so far
    context_tokens: int = 0
    generated_tokens: int = 0  # tokens streamed to the client over all segments
    finished_unix_s: float | None = None
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, stored as JSON


# What update_job may change; the rest is fixed at put_job or set by finish_job.
UPDATABLE_FIELDS = frozenset({"state", "segment_index", "context_tokens", "generated_tokens",
                              "meta"})


@dataclass(frozen=True)
class SegmentProgress:
    """How far one segment got: what a recovered job's client already received."""

    segment: int
    tokens_emitted: int
    finish_reason: str | None = None  # None while the segment runs


@dataclass(frozen=True)
class TranscriptPiece:
    """One piece of a job's history as it was sent: a segment's prompt (text or token ids)
    or the ids the segment generated (all its appended chunks, joined)."""

    segment: int
    role: Literal["prompt", "output"]
    text: str | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StoredResponse:
    """A Response the gateway stored (`store: true`), for `previous_response_id` and GET."""

    response_id: str
    owner: str  # id of the API key that created it: only it may read it back
    session_id: str | None
    created_unix_s: float
    # What the gateway keeps with it, JSON: the Response object as returned, the conversation
    # through it, the session's prefix key (gateway/response_store.py's record).
    payload: dict[str, Any]


@dataclass(frozen=True)
class GatewaySession:
    """A gateway chat session shared by every gateway on the store: who runs a turn on it
    now, and what its job's context holds (gateway/shared_sessions.py's state)."""

    session_id: str
    version: int  # bumped by every change: writes are compare-and-set on it
    holder: str  # the gateway running a turn on it; "" when none
    lease_until_unix_s: float  # a holder that stops renewing loses the session after this
    last_used_unix_s: float
    state: dict[str, Any]  # JSON: the job id and the last turn's prompt, reply and keys


# --- checks ---------------------------------------------------------------------------------
def check_id(value: object, what: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value and not empty_ok:
        raise ValueError(f"{what} is empty")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{what} is {len(value)} characters, at most {MAX_ID_CHARS}")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")  # PostgreSQL text refuses it
    return value


def check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 63:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def check_time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    return float(value)


def check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")
    return value


def to_json(value: object, what: str) -> str:
    """Compact JSON; refuses what JSON cannot hold (NaN too: PostgreSQL's json would not)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serializable: {e}") from None


def check_job(record: JobRecord) -> JobRecord:
    if not isinstance(record, JobRecord):
        raise TypeError(f"put_job takes a JobRecord, got {type(record).__name__}")
    check_id(record.job_id, "job_id")
    check_id(record.owner, "owner", empty_ok=True)
    check_id(record.category, "category", empty_ok=True)
    check_id(record.state, "state")
    check_time(record.arrival_unix_s, "arrival_unix_s")
    for name in ("segment_index", "context_tokens", "generated_tokens"):
        check_count(getattr(record, name), name)
    if record.finished_unix_s is not None:
        check_time(record.finished_unix_s, "finished_unix_s")
    if record.finish_reason is not None:
        check_text(record.finish_reason, "finish_reason")
    if not isinstance(record.meta, dict):
        raise ValueError(f"meta must be a dict, got {type(record.meta).__name__}")
    return record


def check_update(fields: dict[str, Any]) -> dict[str, Any]:
    """The columns to set for update_job(**fields), checked; meta becomes its JSON."""
    if not fields:
        raise ValueError("update_job needs at least one field to set")
    unknown = sorted(set(fields) - UPDATABLE_FIELDS)
    if unknown:
        raise ValueError(f"update_job cannot set {', '.join(unknown)}: it sets "
                         f"{', '.join(sorted(UPDATABLE_FIELDS))}")
    columns = {}
    for name, value in fields.items():
        if name == "state":
            columns[name] = check_id(value, "state")
        elif name == "meta":
            if not isinstance(value, dict):
                raise ValueError(f"meta must be a dict, got {type(value).__name__}")
            columns["meta_json"] = to_json(value, "meta")
        else:
            columns[name] = check_count(value, name)
    return columns


def check_response(response: StoredResponse) -> StoredResponse:
    if not isinstance(response, StoredResponse):
        raise TypeError(f"put_response takes a StoredResponse, got {type(response).__name__}")
    check_id(response.response_id, "response_id")
    check_id(response.owner, "owner", empty_ok=True)
    if response.session_id is not None:
        check_id(response.session_id, "session_id")
    check_time(response.created_unix_s, "created_unix_s")
    if not isinstance(response.payload, dict):
        raise ValueError(f"payload must be a dict, got {type(response.payload).__name__}")
    return response


def check_session(session: GatewaySession) -> GatewaySession:
    if not isinstance(session, GatewaySession):
        raise TypeError(f"put_session takes a GatewaySession, got {type(session).__name__}")
    check_id(session.session_id, "session_id")
    check_count(session.version, "version")
    check_id(session.holder, "holder", empty_ok=True)
    check_time(session.lease_until_unix_s, "lease_until_unix_s")
    check_time(session.last_used_unix_s, "last_used_unix_s")
    if not isinstance(session.state, dict):
        raise ValueError(f"state must be a dict, got {type(session.state).__name__}")
    return session


# --- token ids ------------------------------------------------------------------------------
def pack_ids(token_ids: object, what: str = "token_ids") -> bytes:
    """Token ids as little-endian int32, 4 bytes each (100k ids: 400 kB, not a JSON list)."""
    if isinstance(token_ids, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of integers, got {type(token_ids).__name__}")
    try:
        packed = token_ids if isinstance(token_ids, array) and token_ids.typecode == "i" \
            else array("i", token_ids)
    except OverflowError:
        raise ValueError(f"{what}: a token id is outside the int32 range") from None
    except TypeError as e:
        raise ValueError(f"{what} must be a sequence of integers: {e}") from None
    if packed.itemsize != 4:  # C int is 4 bytes on every platform Python supports today
        raise StoreError(f"array('i') items are {packed.itemsize} bytes here, not 4")
    if sys.byteorder == "big":
        packed = array("i", packed)
        packed.byteswap()
    return packed.tobytes()


def unpack_ids(data: bytes) -> array:
    ids = array("i")
    ids.frombytes(bytes(data))
    if sys.byteorder == "big":
        ids.byteswap()
    return ids
