"""Save and load the predictor's learned state as one JSON file.

What is kept: the API-duration windows per tool category (and the pooled one), the
output-length sums and counts, and the step timings the step-time fit uses (the file's
`step_samples`; the fit is recomputed from them, so it is reproduced exactly). Writes are
atomic — a temporary file in the same directory, fsynced, then `os.replace` — so a crash
mid-save leaves the previous file intact. Files are untrusted on load: anything missing,
mistyped or out of range raises `StateError` naming the file and field, and nothing is built
from a file that fails validation.

`PeriodicSaver` writes the state every few seconds while the service runs (when it changed),
so a process killed without a chance to save loses at most that interval's learning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from astraea.estimators import OnlineEstimator
from astraea.plan import StepTiming

FORMAT = "astraea-predictor-state"
VERSION = 1
SAVE_INTERVAL_S = 10.0  # the service's default period between saves

log = logging.getLogger("astraea.predictor")


class StateError(ValueError):
    """A state file is missing, unreadable, corrupt or of an unknown format."""


@dataclass
class PredictorState:
    estimator: OnlineEstimator
    step_timings: list[StepTiming]
    profile: str = ""  # the profile the state was learned under (informational)


def to_dict(state: PredictorState) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "profile": state.profile,
        "estimator": state.estimator.export_state(),
        "step_samples": [[s.tokens, s.context_tokens_read, s.duration_s]
                         for s in state.step_timings],
    }


def encode_state(state: PredictorState) -> bytes:
    return json.dumps(to_dict(state), separators=(",", ":")).encode()


def save_state(state: PredictorState, path: str | os.PathLike) -> int:
    """Write `state` to `path` atomically; returns the bytes written."""
    return write_atomically(encode_state(state), path)


def write_atomically(data: bytes, path: str | os.PathLike) -> int:
    """`data` into `path` through a fsynced temporary file and `os.replace`: a reader (or a
    crash) sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return len(data)


class PeriodicSaver:
    """Every `interval_s`, on a daemon thread, the state `snapshot()` returns is written to
    `path` (atomically) if it differs from what was last written. A failed write is logged
    (once until one succeeds again) and retried at the next period."""

    def __init__(self, snapshot: Callable[[], PredictorState], path: str | os.PathLike,
                 interval_s: float = SAVE_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.snapshot, self.path, self.interval_s = snapshot, Path(path), interval_s
        self.saves = 0  # files written
        self._last: bytes | None = None
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predictor-state-saver",
                                        daemon=True)

    def start(self) -> PeriodicSaver:
        self._thread.start()
        return self

    def stop(self) -> None:
        """No more periodic saves (the caller then writes the final state itself)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def save_if_changed(self) -> bool:
        """Write the state now if it changed since the last write; whether it wrote."""
        data = encode_state(self.snapshot())
        if data == self._last:
            return False
        write_atomically(data, self.path)
        self._last = data
        self.saves += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.save_if_changed()
            except OSError as e:
                if not self._failing:
                    log.error("cannot save state to %s: %s (retrying every %g s)", self.path,
                              e.strerror or e, self.interval_s)
                self._failing = True
            else:
                if self._failing:
                    log.info("state saved to %s again", self.path)
                self._failing = False


def load_state(path: str | os.PathLike) -> PredictorState:
    """Read and validate a state file written by `save_state`."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"{path}: state file not found") from None
    except OSError as e:
        raise StateError(f"{path}: cannot read state file: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{path}: not a predictor state file (invalid JSON: {e})") from None
    return from_dict(data, str(path))


# --- validation -----------------------------------------------------------------------------


def _req(obj: dict, key: str, kind: type | tuple[type, ...], where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise StateError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is an int subclass; a JSON true is never a valid count or duration here.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise StateError(f"{where}.{key}: expected {_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise StateError(f"{where}.{key}: expected {_name(kind)}, got {type(value).__name__}")
    return value


def _name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _nonneg(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StateError(f"{where}: expected a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise StateError(f"{where}: must be a finite number >= 0, got {value}")
    return float(value)


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateError(f"{where}: must be an integer >= 0, got {value!r}")
    return value


def _check_window(w: dict, size: int, where: str) -> None:
    samples = _req(w, "samples", list, where)
    if len(samples) > size:
        raise StateError(f"{where}.samples: {len(samples)} samples exceed the window of {size}")
    for i, x in enumerate(samples):
        _nonneg(x, f"{where}.samples[{i}]")
    _nonneg(_req(w, "sum", (int, float), where), f"{where}.sum")
    count = _count(_req(w, "count", int, where), f"{where}.count")
    if count < len(samples):
        raise StateError(f"{where}.count: {count} is less than the {len(samples)} samples kept")


def from_dict(data, origin: str = "<state>") -> PredictorState:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StateError(f"{origin}: not a predictor state file (format is not {FORMAT!r})")
    if data.get("version") != VERSION:
        raise StateError(f"{origin}: unsupported state version {data.get('version')!r} "
                         f"(this predictor reads version {VERSION})")
    profile = _req(data, "profile", str, origin)
    est = _req(data, "estimator", dict, origin)
    where = f"{origin}: estimator"
    window = _req(est, "window", int, where)
    if window < 1:
        raise StateError(f"{where}.window: must be >= 1, got {window}")
    _nonneg(_req(est, "prior_api_s", (int, float), where), f"{where}.prior_api_s")
    _nonneg(_req(est, "prior_output_tokens", (int, float), where), f"{where}.prior_output_tokens")
    for cat, w in _req(est, "api", dict, where).items():
        _check_window(w if isinstance(w, dict) else {}, window, f"{where}.api[{cat!r}]")
    _check_window(_req(est, "api_all", dict, where), window, f"{where}.api_all")
    for i, entry in enumerate(_req(est, "outputs", list, where)):
        at = f"{where}.outputs[{i}]"
        key = _req(entry, "key", list, at)
        ok = (len(key) == 0 or (len(key) == 1 and isinstance(key[0], str))
              or (len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], bool)))
        if not ok:
            raise StateError(f"{at}.key: expected [], [category] or [category, first_segment]")
        _nonneg(_req(entry, "sum", (int, float), at), f"{at}.sum")
        _count(_req(entry, "n", int, at), f"{at}.n")
    timings = []
    for i, row in enumerate(_req(data, "step_samples", list, origin)):
        at = f"{origin}: step_samples[{i}]"
        if not isinstance(row, list) or len(row) != 3:
            raise StateError(f"{at}: expected [tokens, context_tokens_read, duration_s]")
        timings.append(StepTiming(_count(row[0], f"{at}[0] (tokens)"),
                                  _count(row[1], f"{at}[1] (context_tokens_read)"),
                                  _nonneg(row[2], f"{at}[2] (duration_s)")))
    return PredictorState(OnlineEstimator.from_state(est), timings, profile)
