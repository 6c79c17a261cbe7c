"""`astraea up`: the predictor, the control plane and N simulated workers (and, with
`http_listen`, the OpenAI gateway) as separate OS processes on loopback, from one
`StackConfig` (flags or a TOML file).

`Stack` starts them in order (predictor, control plane, workers), each with its stderr (JSON
log lines) in ``LOG_DIR/<name>.log`` and its stdout in ``LOG_DIR/<name>.out``, and waits until
each is ready: the predictor and the control plane answer the standard gRPC health check with
SERVING, each worker has logged ``registered`` (the control plane accepted it), and the
gateway answers ``GET /health``. If a
process exits during startup, or readiness takes longer than `startup_timeout_s`, the others
are stopped and `StackError` is raised with the tail of the culprit's log.

Once up, `Stack.supervise` (called periodically: `astraea up` does every 0.5 s) restarts a
service that exits, with the same command line and its log appended to: after
`restart_backoff_s`, doubling at each restart up to `restart_backoff_max_s`, back to the
start once the service has stayed up `restart_stable_s`. Each step is returned as a line for
the operator. A service restarted more than `restart_max` times within `restart_window_s`
keeps failing at start: `supervise` raises `StackError` with its log's tail, and the caller
stops the stack (`restart_max = 0`: any exit does). The others ride the restart out: workers
reconnect to a restarted control plane, the control plane falls back to local estimates while
the predictor is away (and the predictor reloads `predictor_state`, saved periodically).

With `secure` (what `astraea up` does unless told --insecure), `Stack.start` first writes a
development CA, a server certificate and fresh keys to ``LOG_DIR/security/`` (see
`astraea.tools.devcerts`) and starts every service with TLS and keys: clients need the CA and
the client key (`Stack.client_options()`; `astraea up` prints both), workers a worker token,
the control plane a predictor token, the gateway its own control-plane key. Without it (the
default of `StackConfig`, for the benchmarks and tests that drive a loopback stack from the
same process) every service is plaintext and open, as each warns in its log.

`Stack.stop` sends SIGTERM to the workers, then the control plane, then the predictor, waits
up to `shutdown_timeout_s` for each group and SIGKILLs what is left. `Stack` is a context
manager: ``with Stack(cfg) as st: ... st.control_plane_address``.

A TOML file has the `StackConfig` field names as top-level keys, e.g.::

    policy = "astraea"
    profile = "gptj-6b-a100"
    time_scale = 0.05
    workers = 2
    control_plane_listen = "127.0.0.1:50051"
    predictor_listen = "127.0.0.1:50071"   # "" or predictor = false: no predictor service
    log_dir = "astraea-logs"
    settings = ["mlfq.num_levels=3"]   # scheduling settings (control_plane/core/config.py)
    restart_max = 5             # restarts of one service within restart_window_s
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from astraea.tools.devcerts import StackSecurity
from control_plane.core.config import SchedulerConfig

PREDICTOR, CONTROL_PLANE, GATEWAY = "predictor", "control-plane", "gateway"
BACKENDS = ("sim", "vllm")


class StackError(RuntimeError):
    """The stack could not start (or its config is invalid); the message says why."""


@dataclass
class StackConfig:
    """What `Stack` starts. A listen port of 0 means a free loopback port chosen at start."""

    policy: str = "astraea"
    profile: str = "gptj-6b-a100"
    time_scale: float = 1.0
    workers: int = 2
    kv_blocks: int | None = None  # GPU KV blocks per worker (default: the profile's)
    # The workers' engine: "sim" (simulated from the profile) or "vllm" (a real vLLM engine on
    # `model`, a local Hugging Face folder; None: the tiny test model, built on first use).
    backend: str = "sim"
    model: str | None = None
    dtype: str | None = None  # the vLLM workers' --dtype (None: theirs, vLLM's "auto")
    control_plane_listen: str = "127.0.0.1:50051"
    # Scheduling settings for the control plane ("section.field=value", its --set), e.g.
    # ["mlfq.num_levels=3"]; names and defaults in control_plane/core/config.py.
    settings: list[str] = field(default_factory=list)
    predictor: bool = True  # start the predictor service and link the control plane to it
    predictor_listen: str = "127.0.0.1:50071"
    log_dir: str | None = None  # None: a new temporary directory
    log_level: str | None = None  # the services' --log-level (default: theirs)
    # Every service writes its spans here as JSON lines (ASTRAEA_TELEMETRY_SPAN_DIR; read them
    # with `astraea traces`). None: the environment's setting, if any.
    span_dir: str | None = None
    grace_s: float = 1.0  # the services' --grace on shutdown
    # None: 60 s, or 120 s with vLLM workers (each engine takes ~10 s to start, longer on a
    # busy host).
    startup_timeout_s: float | None = None
    shutdown_timeout_s: float = 10.0
    # Attach the workers to this running control plane instead of starting one (and no
    # predictor).
    connect_control_plane: str | None = None
    # The OpenAI gateway (gateway/): None: none; "HOST:PORT": started last, ready when its
    # /health answers. It renders prompts with `tokenizer` (None: the vLLM workers' model,
    # else the tiny model, built on first use) and serves the model named `served_model`.
    http_listen: str | None = None
    api_keys: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    served_model: str = "astraea"
    # The predictor's state file (--state): loaded when it starts or restarts, saved
    # periodically and on shutdown. None: it learns from scratch each time.
    predictor_state: str | None = None
    # The control plane's Prometheus endpoint ("HOST:PORT", port 0: a free one; None: off):
    # `Stack.control_plane_metrics_url` is its /metrics.
    control_plane_metrics: str | None = None
    # The control plane's --state-dir: jobs survive its restarts. A relative path is inside
    # the log dir; None or "": in memory only (a restart loses every job).
    state_dir: str | None = None
    # The gateway's --state-dir: its named sessions survive its restarts. Relative: inside the
    # log dir; None or "": in memory only.
    gateway_state_dir: str | None = None
    # TLS and keys on every service (see the module docstring). Off here, on in `astraea up`.
    secure: bool = False
    # Supervision (see the module docstring).
    restart_max: int = 5
    restart_window_s: float = 60.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    restart_stable_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise StackError(f"time_scale must be positive, got {self.time_scale}")
        if self.workers < 0:
            raise StackError(f"workers must be at least 0, got {self.workers}")
        if self.backend not in BACKENDS:
            raise StackError(f"backend must be one of {', '.join(BACKENDS)}, got "
                             f"{self.backend!r}")
        if self.model is not None and self.backend != "vllm":
            raise StackError("model is for the vllm backend only")
        if self.dtype is not None and self.backend != "vllm":
            raise StackError("dtype is for the vllm backend only")
        if self.startup_timeout_s is None:
            self.startup_timeout_s = 120.0 if self.backend == "vllm" else 60.0
        if not self.startup_timeout_s > 0:
            raise StackError(f"startup_timeout_s must be positive, got {self.startup_timeout_s}")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise StackError(f"kv_blocks must be positive, got {self.kv_blocks}")
        if not self.predictor_listen:
            self.predictor = False
        if self.log_level is not None and self.log_level.lower() not in ("debug", "info"):
            # Start-up waits for each worker's "registered" line, which is logged at info.
            raise StackError(f"log_level must be debug or info for a stack, got "
                             f"{self.log_level!r}: start-up watches the workers' info lines")
        if self.http_listen is not None and not self.api_keys:
            host = _split(self.http_listen)[0]
            if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
                raise StackError(f"http_listen {self.http_listen} is not a loopback address "
                                 "and no API key is set: give api_keys (--api-key)")
        if self.secure and self.connect_control_plane:
            raise StackError("connect_control_plane attaches workers to a control plane this "
                             "stack did not start, whose CA and worker token it cannot know: "
                             "set secure = false (astraea up --insecure)")
        try:
            SchedulerConfig.from_settings(self.settings)
        except ValueError as e:
            raise StackError(f"settings: {e}") from None
        if self.restart_max < 0:
            raise StackError(f"restart_max must be at least 0, got {self.restart_max}")
        for name in ("restart_window_s", "restart_backoff_s", "restart_stable_s"):
            if not getattr(self, name) > 0:
                raise StackError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.restart_backoff_max_s >= self.restart_backoff_s:
            raise StackError(f"restart_backoff_max_s ({self.restart_backoff_max_s}) must be at "
                             f"least restart_backoff_s ({self.restart_backoff_s})")
        for name in ("control_plane_listen", "predictor_listen", "http_listen"):
            value = getattr(self, name)
            if value and not _split(value)[1].isdigit():
                raise StackError(f"{name} must be host:port, got {value!r}")

    @classmethod
    def from_toml(cls, path: str | os.PathLike, defaults: dict | None = None,
                  **overrides) -> StackConfig:
        """The config in the TOML file at `path`; `overrides` (not None) win over it, and it
        wins over `defaults`."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the tomli backport, if installed
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise StackError("reading a TOML config needs Python 3.11+ (or the tomli "
                                 "package)") from None
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise StackError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise StackError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(data, source=str(path), defaults=defaults, **overrides)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", defaults: dict | None = None,
                  **overrides) -> StackConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise StackError(f"{source}: unknown keys {', '.join(unknown)} "
                             f"(known: {', '.join(known)})")
        values = {**(defaults or {}), **data,
                  **{k: v for k, v in overrides.items() if v is not None}}
        for key, value in values.items():
            kind = known[key].type
            ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value)}
            base = kind.split(" | ")[0]
            if not (ok.get(base, True) or (value is None and "None" in kind)):
                raise StackError(f"{source}: {key} must be {kind}, got {value!r}")
        return cls(**values)


def _split(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", port


def _resolve(address: str) -> str:
    """`address` with port 0 replaced by a free port of its host."""
    host, port = _split(address)
    if int(port) != 0:
        return f"{host}:{port}"
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def _connect_address(listen: str) -> str:
    host, port = _split(listen)
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def log_tail(path: str | os.PathLike, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    out: Path
    command: list[str]  # to start it again, as it was
    env: dict | None
    started_s: float  # time.monotonic() of the current process's start
    backoff_step: int = 0  # restarts since it last stayed up restart_stable_s
    restarts: list[float] = field(default_factory=list)  # their times, within the window
    restart_at: float | None = None  # exited: when it is started again


def describe_exit(code: int) -> str:
    """`code` of `Popen.returncode` in words: "code 1", "signal SIGKILL"."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class Stack:
    """The services of `config` as child processes; see the module docstring."""

    config: StackConfig
    control_plane_address: str = ""
    predictor_address: str | None = None
    http_address: str | None = None  # the gateway's base URL, e.g. http://127.0.0.1:8000
    control_plane_metrics_url: str | None = None  # with `control_plane_metrics`
    log_dir: Path = field(default_factory=Path)
    procs: list[_Proc] = field(default_factory=list)
    exit_codes: dict[str, int] = field(default_factory=dict)
    security: StackSecurity | None = None  # with `secure`: the certificates and keys

    # -- introspection --------------------------------------------------------------------
    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self.procs}

    @property
    def log_files(self) -> dict[str, Path]:
        return {p.name: p.log for p in self.procs}

    def client_options(self) -> dict[str, str]:
        """What a client of this stack's control plane passes to `AgentClient` (or
        `AsyncAgentClient`) beside the address: {} when the stack is not `secure`."""
        sec = self.security
        return {} if sec is None else {"api_key": sec.client_key, "tls_ca": str(sec.certs.ca)}

    def dead(self) -> list[tuple[str, int]]:
        """(name, exit code) of every process that has exited."""
        return [(p.name, p.popen.returncode) for p in self.procs if p.popen.poll() is not None]

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Stack:
        cfg = self.config
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(
            tempfile.mkdtemp(prefix="astraea-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + cfg.startup_timeout_s
        if cfg.secure:
            hosts = [_split(a)[0] for a in (cfg.control_plane_listen, cfg.predictor_listen) if a]
            self.security = StackSecurity.create(self.log_dir / "security", hosts)
        sec = self.security
        common = ["--profile", cfg.profile]
        if cfg.log_level:
            common += ["--log-level", cfg.log_level]
        try:
            if cfg.connect_control_plane:
                self.control_plane_address = cfg.connect_control_plane
            else:
                if cfg.predictor:
                    listen = _resolve(cfg.predictor_listen)
                    self.predictor_address = _connect_address(listen)
                    state = ["--state", cfg.predictor_state] if cfg.predictor_state else []
                    pred = self._spawn(PREDICTOR, "predictor_svc.server", "--listen", listen,
                                       "--grace", str(cfg.grace_s), *state, *common,
                                       *(sec.predictor_args() if sec else ()))
                    self._wait_serving(pred, self.predictor_address, deadline)
                listen = _resolve(cfg.control_plane_listen)
                self.control_plane_address = _connect_address(listen)
                args = ["--listen", listen, "--policy", cfg.policy, "--time-scale",
                        repr(cfg.time_scale), "--grace", str(cfg.grace_s), *common]
                if self.predictor_address:
                    args += ["--predictor", self.predictor_address]
                if sec:
                    args += sec.control_plane_args()
                if cfg.state_dir:
                    args += ["--state-dir", str(self.log_dir / cfg.state_dir)]
                for setting in cfg.settings:
                    args += ["--set", setting]
                if cfg.control_plane_metrics:
                    metrics = _resolve(cfg.control_plane_metrics)
                    host, port = _split(metrics)
                    args += ["--metrics-host", host, "--metrics-port", port]
                    self.control_plane_metrics_url = f"http://{_connect_address(metrics)}/metrics"
                cp = self._spawn(CONTROL_PLANE, "control_plane.service.server", *args)
                self._wait_serving(cp, self.control_plane_address, deadline)
            workers = []
            for i in range(1, cfg.workers + 1):
                args = ["--control-plane", self.control_plane_address, "--time-scale",
                        repr(cfg.time_scale), "--name", f"w{i}", "--backend", cfg.backend,
                        # A SIGTERM drains the worker: within half the time `stop` waits.
                        "--drain-timeout", repr(cfg.shutdown_timeout_s / 2), *common]
                if cfg.model is not None:
                    args += ["--model", cfg.model]
                if cfg.dtype is not None:
                    args += ["--dtype", cfg.dtype]
                if cfg.kv_blocks is not None:
                    args += ["--kv-blocks", str(cfg.kv_blocks)]
                if sec:
                    args += sec.worker_args()
                workers.append(self._spawn(f"worker-w{i}", "worker.process", *args))
            self._wait_registered(workers, deadline)
            if cfg.http_listen is not None:
                self._start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_gateway(self) -> None:
        cfg = self.config
        listen = _resolve(cfg.http_listen)
        tokenizer = cfg.tokenizer
        if tokenizer is None:
            from worker.vllm.tiny_model import resolve_model, resolve_tokenizer

            # Simulated workers need only the tiny model's tokenizer (built without torch).
            tokenizer = (resolve_model(cfg.model) if cfg.backend == "vllm"
                         else resolve_tokenizer(None))
        # Its own start-up time: building the tiny model above may have taken a while.
        deadline = time.monotonic() + cfg.startup_timeout_s
        args = ["--listen", listen, "--control-plane", self.control_plane_address,
                "--model", cfg.served_model, "--tokenizer", tokenizer]
        for key in cfg.api_keys:
            args += ["--api-key", key]
        if cfg.log_level:
            args += ["--log-level", cfg.log_level]
        if self.security:
            args += self.security.gateway_args()
        if cfg.gateway_state_dir:
            args += ["--state-dir", str(self.log_dir / cfg.gateway_state_dir)]
        proc = self._spawn(GATEWAY, "gateway.server", *args)
        self.http_address = f"http://{_connect_address(listen)}"
        self._wait_http(proc, f"{self.http_address}/health", deadline)

    def _wait_http(self, proc: _Proc, url: str, deadline: float) -> None:
        import urllib.error
        import urllib.request

        while True:
            self._check_alive(proc.name)
            try:
                with urllib.request.urlopen(url, timeout=0.5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise self._fail(proc, f"did not answer {url} within "
                                       f"{self.config.startup_timeout_s:g} s")
            time.sleep(0.1)

    def _spawn(self, name: str, module: str, *args: str) -> _Proc:
        log, out = self.log_dir / f"{name}.log", self.log_dir / f"{name}.out"
        env = None
        if self.config.span_dir:
            env = {**os.environ, "ASTRAEA_TELEMETRY_SPAN_DIR": self.config.span_dir}
        command = [sys.executable, "-m", module, *args]
        proc = _Proc(name, _popen(command, env, log, out, "wb"), log, out, command, env,
                     time.monotonic())
        self.procs.append(proc)
        return proc

    # -- supervision ----------------------------------------------------------------------
    def supervise(self, now: float | None = None) -> list[str]:
        """One round of supervision (see the module docstring): note the services that have
        exited and start again those whose delay is over. Returns what it did, a line each;
        raises `StackError` when a service exceeds `restart_max` restarts in the window."""
        cfg = self.config
        now = time.monotonic() if now is None else now
        lines = []
        for p in self.procs:
            if p.restart_at is not None:
                if now >= p.restart_at:
                    p.popen = _popen(p.command, p.env, p.log, p.out, "ab")
                    p.started_s, p.restart_at = now, None
                    lines.append(f"{p.name} restarted (pid {p.popen.pid}, restart "
                                 f"{len(p.restarts)} in the last {cfg.restart_window_s:g} s)")
                continue
            code = p.popen.poll()
            if code is None:
                continue
            up_s = now - p.started_s
            p.restarts = [t for t in p.restarts if now - t < cfg.restart_window_s]
            if len(p.restarts) >= cfg.restart_max:
                why = (f"{len(p.restarts)} restarts within {cfg.restart_window_s:g} s (restart_max "
                       f"{cfg.restart_max}): it keeps failing, giving up" if cfg.restart_max
                       else "restart_max is 0: no restarts")
                raise self._fail(p, f"exited with {describe_exit(code)} after {up_s:.1f} s up, "
                                    f"{why}")
            if up_s >= cfg.restart_stable_s:
                p.backoff_step = 0
            delay = min(cfg.restart_backoff_max_s, cfg.restart_backoff_s * 2 ** p.backoff_step)
            p.backoff_step += 1
            p.restarts.append(now)
            p.restart_at = now + delay
            lines.append(f"{p.name} (pid {p.popen.pid}) exited with {describe_exit(code)} after "
                         f"{up_s:.1f} s up; restart {len(p.restarts)} in {delay:g} s (log: "
                         f"{p.log})")
        return lines

    def _fail(self, proc: _Proc, why: str) -> StackError:
        return StackError(f"{proc.name} {why}; the last lines of {proc.log}:\n"
                          f"{log_tail(proc.log)}")

    def _check_alive(self, waiting: str) -> None:
        for p in self.procs:
            code = p.popen.poll()
            if code is not None:
                raise self._fail(p, f"exited with code {code} during startup (waiting for {waiting})")

    def _wait_serving(self, proc: _Proc, address: str, deadline: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        serving = health_pb2.HealthCheckResponse.SERVING
        if self.security is None:
            channel = grpc.insecure_channel(address)
        else:  # the health service checks no key, but the port speaks TLS
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
                self.security.certs.ca.read_bytes()))
        with channel as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                self._check_alive(proc.name)
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == serving:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise self._fail(proc, f"did not report SERVING at {address} within "
                                           f"{self.config.startup_timeout_s:g} s")
                time.sleep(0.05)

    def _wait_registered(self, workers: list[_Proc], deadline: float) -> None:
        pending = list(workers)
        while pending:
            for w in list(pending):
                if _logged(w.log, "registered"):
                    pending.remove(w)
            if not pending:
                return
            self._check_alive(pending[0].name)
            if time.monotonic() > deadline:
                raise self._fail(pending[0], f"did not register with the control plane at "
                                             f"{self.control_plane_address} within "
                                             f"{self.config.startup_timeout_s:g} s")
            time.sleep(0.05)

    def stop(self) -> dict[str, int]:
        """SIGTERM the gateway, the workers, then the control plane, then the predictor;
        SIGKILL any that do not exit within `shutdown_timeout_s`. Returns every process's exit
        code (a SIGKILLed one: -9). Idempotent."""
        groups = [[p for p in self.procs if p.name == GATEWAY],
                  [p for p in self.procs if p.name.startswith("worker-")],
                  [p for p in self.procs if p.name == CONTROL_PLANE],
                  [p for p in self.procs if p.name == PREDICTOR]]
        for group in groups:
            for p in group:
                if p.popen.poll() is None:
                    with _suppress_lookup():
                        p.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.config.shutdown_timeout_s
            for p in group:
                try:
                    p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with _suppress_lookup():
                        p.popen.kill()
                    p.popen.wait()
                self.exit_codes[p.name] = p.popen.returncode
        return dict(self.exit_codes)


def _popen(command: list[str], env: dict | None, log: Path, out: Path,
           mode: str) -> subprocess.Popen:
    with open(log, mode) as err_f, open(out, mode) as out_f:
        # Its own session: a Ctrl-C at the terminal reaches `astraea up` only, which then
        # stops the services in order.
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                start_new_session=True, env=env)


class _suppress_lookup:
    """Ignore ProcessLookupError (the process has just exited)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        return kind is ProcessLookupError


def _logged(path: Path, event: str) -> bool:
    """Whether the JSON log at `path` has a line with this `event`."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    if event not in text:
        return False
    for line in text.splitlines():
        try:
            if json.loads(line).get("event") == event:
                return True
        except (ValueError, AttributeError):
            continue
    return False
