"""The ``rankalloc`` command: one parser with a subcommand per module.

Each subcommand lives in its own module listed in :data:`COMMANDS`. The module provides

* ``HELP``: a one-line summary (shown by ``rankalloc --help``);
* ``add_arguments(parser)``: adds its options (and may set ``parser.description``/``epilog``);
* ``run(args) -> int``: unpacks the namespace, calls library functions with explicit
  arguments and returns the exit code.

Only the module of the chosen subcommand is imported, so ``rankalloc allocate`` never loads
torch. Exit codes: 0 success, 1 failure (bad input, missing file, infeasible budget: one
line on stderr, no traceback), 2 command-line usage error, 130 interrupted.

Several processes: the subcommands in :data:`DISTRIBUTED` also run under ``torchrun ... -m rankalloc COMMAND``
(``WORLD_SIZE > 1``): every rank runs the same command, only rank 0 prints results, and an error on any rank is
one line prefixed by the rank (``rankalloc profile [rank 1]: error: ...``), a lost or late rank included
(:class:`rankalloc.profiling.distributed.RankError`). The others refuse torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from typing import Sequence

COMMANDS: dict[str, str] = {
    "profile": "rankalloc.studies.cmd_profile",
    "allocate": "rankalloc.studies.cmd_allocate",
    "compress": "rankalloc.studies.cmd_compress",
    "evaluate": "rankalloc.studies.cmd_evaluate",
    "compare": "rankalloc.studies.cmd_compare",
    "pareto": "rankalloc.studies.cmd_pareto",
    "check": "rankalloc.studies.cmd_check",
}
"""Subcommand name -> module. Add a subcommand by adding its module here."""

DISTRIBUTED = ("profile", "compress", "evaluate")
"""Subcommands that run under torchrun, split across its processes (:mod:`rankalloc.profiling.distributed`)."""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _summary(module_name: str) -> str:
    """The first docstring line of a subcommand module, read without importing it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return "(module missing)"
    try:
        import ast

        with open(spec.origin, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``rankalloc`` parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="rankalloc",
        description="Rank allocation for training-free low-rank compression of LLMs. "
                    "Budgets are fractions REMOVED (0.4 = 40% of the dense cost removed).",
        epilog="Run `rankalloc COMMAND --help` for the options and examples of a command.\n"
               "Exit codes: 0 success, 1 failure (one-line error), 2 usage error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=_summary(module_name), add_help=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    for token in argv:
        if token in COMMANDS:
            return token
        if not token.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rankalloc`` command; returns the exit code."""
    import rankalloc  # noqa: F401  (loads OR-tools before anything can load cvxpy)

    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    label, errors = f"rankalloc {args.command}", (ValueError, OSError)
    try:
        if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
            return int(args._run(args))
        from rankalloc.profiling import distributed  # under torchrun

        label, errors = f"{label} [rank {os.environ.get('RANK', '?')}]", errors + (distributed.RankError,)
        with _processes(args.command, distributed):
            return int(args._run(args))
    except errors as exc:  # bad input, missing file, unreachable hub id, a lost rank
        text = " ".join(str(exc).split())  # one line
        print(f"{label}: error: {text}", file=sys.stderr)
        return _failed(EXIT_FAILURE)
    except KeyboardInterrupt:
        print(f"rankalloc {args.command}: interrupted", file=sys.stderr)
        return _failed(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001  a bug: bad input raises ValueError naming the culprit at its source
        text = " ".join(str(exc).split())
        from rankalloc.allocators.registry import plugin_frame

        where = plugin_frame(exc)
        if where is not None:  # raised by a --plugin's solver, cost model or method: the plugin's fault
            print(f"rankalloc {args.command}: error: {type(exc).__name__}: {text} (raised in plugin file {where[0]}, "
                  f"line {where[1]})", file=sys.stderr)
            return _failed(EXIT_FAILURE)
        print(f"rankalloc {args.command}: error: {type(exc).__name__}: {text} (an unexpected error: a bug in "
              f"rankalloc; please report it with the command line)", file=sys.stderr)
        return _failed(EXIT_FAILURE)


def _failed(code: int) -> int:
    """``code``; a rank that failed inside a process group leaves at once with it (its ``finally`` blocks have run).

    The group is not left after a failure (a failed peer could keep that waiting), and letting the interpreter tear
    a live gloo group down aborted the process instead ("terminate called without an active exception", exit -6
    in place of 1, seen in CI when two ranks failed together)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


@contextlib.contextmanager
def _processes(command: str, distributed):
    """Inside the block this process is in the group of a subcommand of :data:`DISTRIBUTED`, and stdout goes nowhere
    on ranks other than 0. The group is left after a success only (a failed peer could keep the exit waiting)."""
    if command not in DISTRIBUTED:
        raise ValueError(f"runs in one process; launch it without torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}); "
                         f"these run under torchrun: {', '.join(DISTRIBUTED)}")
    distributed.init_from_env()
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere if not distributed.is_main() else
                                                                      sys.stdout):
        yield
    distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
