"""The worker's command line (`astraea-worker`, `python -m worker.process`): its options and
the engine backend they ask for. Its defaults live here so the process and its parser agree."""

from __future__ import annotations

import argparse

from astraea.auth import add_client_arguments
from astraea.telemetry import add_log_level_argument, prometheus
from worker.backend import Backend

HEARTBEAT_INTERVAL_S = 1.0  # well under the control plane's default --worker-timeout (10 s)
# Set explicitly rather than left to gRPC's defaults (4 MiB received, no send limit). A plan's
# Admit can carry a whole prompt or history: 16 MiB holds far more than a context window of
# token ids. A larger (or unparsable) control message ends the stream with a line saying so,
# and the worker reconnects. gRPC itself refuses one over twice the limit without reading it
# (grpc.aio then reports only "INTERNAL: Internal error from Core").
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DRAIN_TIMEOUT_S = 25.0  # under Kubernetes' default grace period (30 s) before its SIGKILL


def make_backend(args: argparse.Namespace) -> Backend:
    """The engine backend the command line asks for."""
    if args.backend == "vllm":
        # Imported only here: the simulated worker needs no vLLM.
        from worker.vllm.backend import VllmBackend
        from worker.vllm.engine import EngineConfig
        from worker.vllm.tiny_model import resolve_model

        return VllmBackend(EngineConfig(
            model=resolve_model(args.model),
            # The pool includes vLLM's null block: one more than the usable blocks asked for.
            num_blocks=None if args.kv_blocks is None else args.kv_blocks + 1,
            max_model_len=args.max_model_len, dtype=args.dtype,
            gpu_memory_utilization=args.gpu_memory_utilization,
            host_swap_blocks=args.host_swap_blocks,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            distributed_executor_backend=args.distributed_executor_backend))
    from astraea.profile import load_profile
    from worker.sim.backend import SimulatedBackend

    if args.backend != "sim":
        raise ValueError(f"unknown backend {args.backend!r}")
    return SimulatedBackend(load_profile(args.profile), time_scale=args.time_scale,
                            kv_blocks=args.kv_blocks)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of `astraea-worker` (tests check docker/compose.yaml against it)."""
    parser = argparse.ArgumentParser(prog="astraea-worker", description="Astraea worker")
    parser.add_argument("--control-plane", default="127.0.0.1:50051", help="host:port")
    parser.add_argument("--backend", default="sim", choices=["sim", "vllm"])
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="vllm: a local Hugging Face model folder, or a model the project "
                             "builds on first use: tiny (default) or small")
    parser.add_argument("--profile", default="gptj-6b-a100")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="wall seconds per engine second (< 1 runs faster than real time)")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="GPU KV blocks (sim default: from the profile; vllm: the usable "
                             "blocks of vLLM's pool, default: sized by vLLM from memory)")
    vllm = parser.add_argument_group("vllm backend")
    vllm.add_argument("--dtype", default="auto",
                      help="weights and activations (vLLM's: auto = the model's own)")
    vllm.add_argument("--max-model-len", type=int, default=None,
                      help="context window (default: the model's, or what --kv-blocks holds)")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                      help="share of the GPU for weights and KV cache (vLLM's)")
    vllm.add_argument("--host-swap-blocks", type=int, default=256,
                      help="host memory for swapped-out KV, in blocks")
    vllm.add_argument("--tensor-parallel-size", type=_positive_int, default=1, metavar="N",
                      help="split each layer's heads over N ranks (GPUs)")
    vllm.add_argument("--pipeline-parallel-size", type=_positive_int, default=1, metavar="M",
                      help="split the layers into M stages (GPUs or nodes)")
    vllm.add_argument("--distributed-executor-backend", choices=["mp", "ray"], default=None,
                      help="how vLLM starts the ranks: mp = processes on this node (its default "
                           "for more than one rank), ray = a Ray cluster across nodes")
    parser.add_argument("--name", default=None, help="default: <hostname>:<backend>")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S,
                        metavar="SECONDS",
                        help="send a heartbeat when nothing else was sent for this long; keep "
                             "it well under the control plane's --worker-timeout")
    parser.add_argument("--reconnect-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="exit (code 1) after this long without a control plane; retries "
                             "back off from 0.5 s to 10 s (default 0: keep retrying)")
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S,
                        metavar="SECONDS",
                        help="on SIGTERM/SIGINT, finish the running segments for at most this "
                             "long while the control plane places nothing new here, then exit; "
                             "a second signal stops at once (default 25; 0: stop at once)")
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        metavar="BYTES", help="largest gRPC message sent or received (default "
                                              "16 MiB); a larger one ends the stream, and the "
                                              "worker reconnects")
    add_client_arguments(parser, "--token-file", title="security (the control plane's)",
                         key_help="the control plane's worker token (its --worker-token-file): "
                                  "the first line of FILE")
    add_log_level_argument(parser)
    prometheus.add_metrics_arguments(parser)
    return parser
