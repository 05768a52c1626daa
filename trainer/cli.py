"""`featurewire-train`: the trainer's command line.

Each subcommand is one `_add_<name>` function that builds its parser and sets `handler`; adding
`train`, `eval`, `report` or `export-onnx` means writing one more pair and listing it in
`_SUBCOMMANDS`. Handlers import heavy modules (torch, transformers) inside themselves, so `--help`
and `corpus` stay instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from trainer import corpus as corpus_mod

PROG = "featurewire-train"
# User errors: reported as one line on stderr with this exit code (argparse uses 2 for bad usage too).
EXIT_USAGE = 2


def _add_corpus_options(parser: argparse.ArgumentParser) -> None:
    """Corpus and split options, shared by every subcommand that reads a corpus."""
    parser.add_argument(
        "--corpus", default=corpus_mod.DEFAULT_SPEC, metavar="SPEC",
        help="'default' (text shipped with Python), a text file, a .jsonl file, "
        "or a directory of .txt/.md/.jsonl files (default: %(default)s)",
    )
    parser.add_argument("--text-field", default="text", metavar="F",
                        help="JSON field holding the text in .jsonl files (default: %(default)s)")
    parser.add_argument("--calibration-fraction", type=float, default=0.05, metavar="P",
                        help="fraction of documents held out for calibration (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, metavar="P",
                        help="fraction of documents held out for evaluation (default: %(default)s)")
    parser.add_argument("--split-seed", type=int, default=0, metavar="N",
                        help="seed of the per-document split hash (default: %(default)s)")


def _add_corpus(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "corpus", help="load a corpus and print its split sizes",
        description="Load a corpus, split it by document, and print document and character counts.",
    )
    _add_corpus_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_run_corpus)


def _corpus_report(args: argparse.Namespace) -> dict:
    """Load and split the corpus named by the shared options; counts per split and in total."""
    docs = corpus_mod.load_corpus(args.corpus, text_field=args.text_field)
    splits = corpus_mod.split_documents(
        docs, calibration_fraction=args.calibration_fraction,
        eval_fraction=args.eval_fraction, seed=args.split_seed,
    )
    return {
        "corpus": args.corpus,
        "split_seed": args.split_seed,
        "splits": {name: corpus_mod.corpus_stats(split) for name, split in splits.items()},
        "total": corpus_mod.corpus_stats(docs),
    }


def _format_table(report: dict) -> str:
    rows = [*report["splits"].items(), ("total", report["total"])]
    lines = [f"corpus: {report['corpus']}  (split seed {report['split_seed']})",
             f"{'split':<12}{'documents':>11}{'characters':>14}"]
    lines += [f"{name:<12}{s['documents']:>11,}{s['characters']:>14,}" for name, s in rows]
    return "\n".join(lines)


def _run_corpus(args: argparse.Namespace) -> int:
    report = _corpus_report(args)
    print(json.dumps(report, indent=2) if args.json else _format_table(report))
    return 0


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_corpus,)


def build_parser() -> argparse.ArgumentParser:
    """The full parser; exposed so tests and docs can inspect it."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train, evaluate and export featurewire SAE stacks (offline).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `featurewire-train` and `python -m trainer`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
