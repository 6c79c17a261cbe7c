"""The `astraea` command: builds the parser from the command modules and runs the chosen command.

Each command module registers its subcommands with `add_parsers(subparsers)`, setting `func`
(the command: arguments in, exit code out) on each. A module imports only the standard library
and `astraea.profile` at its top; a command imports what it drives (the simulator, the stack,
gRPC, vLLM) when it runs, so `astraea --help` does not load them.
"""

from __future__ import annotations

import argparse
import sys

from astraea.tools.cli import (
    bench,
    bench_gateway,
    bench_service,
    bench_soak,
    bench_vllm,
    certs,
    chaos,
    profile,
    replay,
    stack,
    trace,
    traces,
)

DESCRIPTION = ("`astraea` command line: benchmarks, traces, profiles, and replays on the live "
               "stack.")
COMMAND_MODULES = (bench, bench_service, bench_soak, bench_gateway, bench_vllm, trace, replay, stack, traces, profile,
                   certs, chaos)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astraea", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:  # in the order `astraea --help` lists them
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not _is_usage_error(e):
            raise
        print(f"astraea: error: {e}", file=sys.stderr)
        return 2


def _is_usage_error(e: Exception) -> bool:
    """Whether `e` is a bad flag, file, trace, profile or stack config: reported in one line
    with exit code 2, not a traceback. TraceError and ProfileError are ValueErrors; StackError
    is imported only here, as the stack is one of the modules commands load when they run."""
    from astraea.tools.stack import StackError

    return isinstance(e, (ValueError, argparse.ArgumentTypeError, StackError))


if __name__ == "__main__":
    sys.exit(main())
