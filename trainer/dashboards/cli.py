"""The `dashboards` and `explanations` subcommands of featurewire-train (kept apart from trainer/cli.py, which
only registers them); handlers import torch lazily so `--help` stays instant."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from core.config import ModelConfig, add_model_arguments, model_config_from_args
from core.stack.dashboards import LABEL_LIMIT

DEFAULTS = {"tokens": 50_000, "top_n": 20, "context": 10, "quantiles": 5, "per_quantile": 4, "label_tokens": 8}


def add_dashboards(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboards", help="compute every feature's dashboard and store it in the stack",
        description="One pass of the host model over held-out text (the eval split of the stack's training corpus "
        "by default) that records, per feature of every stage: firing density, mean and max activation, a "
        "log-binned activation histogram, the top activating examples and examples from activation quantiles "
        "with their context, logit-lens tokens, nearest features by decoder cosine in the same and the other "
        "stages, the features it co-occurs with, and an LLM-free label: the tokens it fires on with their share of "
        "its firing mass, and the exact precision, recall and F1 of the rule 'fires exactly on these tokens' over "
        "the pass. Signed (SA-GSAE) features are reported per sign. Under torchrun every rank takes its share of "
        "the documents.")
    parser.add_argument("--stack", required=True, metavar="DIR")
    parser.add_argument("--corpus", metavar="SPEC", help="default: the stack's training corpus (its eval split)")
    parser.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="held-out tokens to read")
    parser.add_argument("--top-n", type=int, default=DEFAULTS["top_n"], help="top examples per feature and sign")
    parser.add_argument("--context", type=int, default=DEFAULTS["context"],
                        help="tokens kept on each side of an example's firing token")
    parser.add_argument("--quantiles", type=int, default=DEFAULTS["quantiles"],
                        help="activation intervals of equal firing mass to draw examples from")
    parser.add_argument("--per-quantile", type=int, default=DEFAULTS["per_quantile"], help="examples per interval")
    parser.add_argument("--label-tokens", type=int, default=DEFAULTS["label_tokens"],
                        help=f"most tokens in a feature's label (0 to {LABEL_LIMIT}; 0: no labels, no firings kept "
                        "on disk during the pass)")
    parser.add_argument("--batch-size", type=int, help="windows per forward pass (default: as in training)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser, default_model="the one the stack names")
    parser.set_defaults(handler=run_dashboards)


def run_dashboards(args: argparse.Namespace) -> int:
    from core.stack.reader import read_stack
    from trainer.dashboards.accumulator import DashboardSettings
    from trainer.dashboards.build import build_dashboards, describe
    from trainer.evaluation.held_out import open_held_out
    from trainer.training.distributed import session

    if args.tokens < 1:
        raise ValueError(f"--tokens must be at least 1, got {args.tokens}")
    if not 0 <= args.label_tokens <= LABEL_LIMIT:
        raise ValueError(f"--label-tokens must be in [0, {LABEL_LIMIT}], got {args.label_tokens}")
    model = model_config_from_args(args, os.environ, defaults=ModelConfig(name=read_stack(args.stack).identity.name))
    settings = DashboardSettings(top_n=args.top_n, context=args.context, quantiles=args.quantiles,
                                 per_quantile=args.per_quantile, label_n=args.label_tokens)
    with session(os.environ, model.device) as parallel:
        held = open_held_out(args.stack, corpus=args.corpus, model_config=model)
        summary = build_dashboards(args.stack, held.host, held.documents, corpus=held.corpus, settings=settings,
                                   context_length=held.context_length, batch_size=args.batch_size or held.batch_size,
                                   max_tokens=args.tokens, parallel=parallel, progress=not args.quiet)
        if parallel.is_main:
            print(f"dashboards: {summary['tokens']:,} tokens from {summary['documents']} documents in "
                  f"{summary['seconds']:.1f} s ({summary['tokens_per_second']:,.0f} tokens/s), "
                  f"finished in {summary.get('finish_seconds', 0.0):.1f} s")
            print("\n".join(describe(read_stack(args.stack))))
    return 0


def add_explanations(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explanations", help="attach one-line feature descriptions to a stack",
        description="Read FILE.jsonl, one object per line with stage (a stage name), feature (an id) and "
        "explanation (one line of text, e.g. from an existing interpretability pipeline), and store them in the "
        "stack (hashed, replacing what it had); the server returns and searches them.")
    parser.add_argument("--stack", required=True, metavar="DIR")
    parser.add_argument("--from", dest="source", required=True, metavar="FILE.jsonl")
    parser.set_defaults(handler=run_explanations)


def read_explanations_jsonl(path: Path) -> dict[str, dict[int, str]]:
    """{stage: {feature: text}} from JSON lines; a malformed line is an error naming its line number."""
    table: dict[str, dict[int, str]] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            text = row.get("explanation", row.get("description")) if isinstance(row, dict) else None
            feature = row.get("feature") if isinstance(row, dict) else None
            if not (isinstance(row, dict) and isinstance(row.get("stage"), str) and type(feature) is int
                    and feature >= 0 and isinstance(text, str) and text.strip()):
                expected = '{"stage": NAME, "feature": ID, "explanation": TEXT}'
                raise ValueError(f"{path}:{number}: expected {expected}")
            table.setdefault(row["stage"], {})[feature] = " ".join(text.split())
    return table


def run_explanations(args: argparse.Namespace) -> int:
    from core.stack.dashboards import attach_explanations

    table = read_explanations_jsonl(Path(args.source))
    name = attach_explanations(args.stack, table)
    count = sum(len(features) for features in table.values())
    print(f"explanations: {count} features in {len(table)} stages -> {Path(args.stack) / name}")
    return 0

