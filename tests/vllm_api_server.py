"""vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) as a process, on
the engine settings an Astraea vLLM worker runs with, for tests that compare the two.

Why it is slow to start, and what keeps it from being slower. The server is several processes:
the API server, and the engine core it always spawns (`AsyncLLM` has no in-process engine);
by default the CPU build also moves the model into a third, spawned worker process (it
forces the mp executor while `VLLM_ENABLE_V1_MULTIPROCESSING` is 1, platforms/cpu.py). Each
spawned process imports torch and vLLM again from nothing. On a quiet two-core machine
that is tens of seconds each; with the cores shared by many busy processes, minutes each,
which is how a 300 s start-up budget ran out. With `VLLM_ENABLE_V1_MULTIPROCESSING=0`, as
the worker sets it (worker/vllm/engine.py), the model stays in the engine core process:
one import fewer, and the same executor (uni-process) the worker runs the model in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from worker.vllm.config import EngineConfig, max_model_len_of

# What worker/vllm/engine.py sets for vLLM on CPU (as defaults: a value the caller's
# environment gives reaches the stack's workers, which inherit it, just the same).
WORKER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def engine_flags(config: EngineConfig) -> list[str]:
    """The api_server flags for the engine `worker.vllm.config.engine_args` builds from
    `config`, less Astraea's own scheduler and worker extension (they record and move KV;
    they decide nothing about which tokens come out)."""
    flags = ["--dtype", config.dtype, "--seed", str(config.seed),
             "--block-size", str(config.block_size),
             "--gpu-memory-utilization", str(config.gpu_memory_utilization),
             "--max-num-seqs", str(config.max_num_seqs),
             "--max-num-batched-tokens", str(config.max_num_batched_tokens),
             # Fixed in engine_args, whatever the config.
             "--enforce-eager", "--enable-prefix-caching", "--scheduling-policy", "priority",
             "--no-async-scheduling"]
    max_len = max_model_len_of(config)
    if max_len is not None:
        flags += ["--max-model-len", str(max_len)]
    if config.num_blocks is not None:
        flags += ["--num-gpu-blocks-override", str(config.num_blocks)]
    return flags


def worker_engine_config(model: str, dtype: str) -> EngineConfig:
    """The engine of a stack's vLLM worker started with no engine options but `dtype` (as
    `astraea.tools.stack.Stack` starts it, `StackConfig.dtype`): vLLM sizes the KV pool.
    The server must run the worker's dtype: on another it decodes other tokens after a few
    steps. A worker without --dtype runs vLLM's "auto", which on CPU downcasts the tiny
    model's float32 weights to bfloat16 (vllm/config/model.py)."""
    return EngineConfig(model=model, num_blocks=None, dtype=dtype)


@dataclass
class ApiServer:
    process: subprocess.Popen
    base_url: str  # http://127.0.0.1:PORT/v1
    log_path: Path

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(no log: {e})"

    def wait_ready(self, timeout_s: float) -> None:
        """Until /health answers 200; raises RuntimeError (with the log's end) when the
        process exits or `timeout_s` passes first."""
        start = time.monotonic()
        health = self.base_url.removesuffix("/v1") + "/health"
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"vLLM's api_server exited with code {code} during "
                                   f"start-up; its log ({self.log_path}) ends:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health, timeout=5).status_code == 200:
                    return
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise RuntimeError(f"vLLM's api_server did not answer {health} within "
                                   f"{timeout_s:.0f} s (a loaded machine starts it slowly: "
                                   f"each of its processes imports torch and vLLM); its log "
                                   f"({self.log_path}) ends:\n{self.log_tail()}")
            time.sleep(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first (vLLM shuts its engine core down on it; it was seen to ignore SIGTERM
    while busy), then SIGKILL to the whole process group: no engine core is left behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def api_server(config: EngineConfig, served_model: str,
               log_dir: str | os.PathLike | None = None) -> Iterator[ApiServer]:
    """Start the server (not waiting for it: see `ApiServer.wait_ready`), yield it, stop it.
    The chat template is the model folder's own (tokenizer_config.json), as the gateway's."""
    port = _free_port()
    folder = Path(log_dir) if log_dir is not None else Path(
        tempfile.mkdtemp(prefix="astraea-vllm-api-"))
    log_path = folder / "vllm-api-server.log"
    env = dict(os.environ)
    for key, value in WORKER_ENV.items():
        env.setdefault(key, value)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", config.model, "--served-model-name", served_model,
           "--host", "127.0.0.1", "--port", str(port), *engine_flags(config)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield ApiServer(proc, f"http://127.0.0.1:{port}/v1", log_path)
    finally:
        _stop(proc)
