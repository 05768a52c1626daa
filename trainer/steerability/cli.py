"""The `steerability` subcommand of featurewire-train (registered by trainer/cli.py); torch is imported lazily."""

from __future__ import annotations

import argparse
import os

from core.config import ModelConfig, add_model_arguments, model_config_from_args
from trainer.steerability.schedule import (
    DEFAULT_STRENGTHS,
    EXPRESSION_THRESHOLD,
    FLUENCY_THRESHOLD,
    REPETITION_THRESHOLD,
)


def add_steerability(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "steerability", help="measure whether steering each feature makes the output express it, and at what cost",
        description="Steer features over a strength schedule from neutral openings (greedy and sampled with fixed "
        "seeds, many features x openings x strengths per batch), re-read each continuation with no edit through the "
        "same stack, and store per feature: expression (firing rate on the generated tokens) and its lift over the "
        "default branch, the share of its top dashboard tokens, the fluency cost (nats/token under the unsteered "
        "model beyond the default continuation's), a repetition rate, an output score from one intervened forward "
        f"pass, and a verdict: the smallest strength whose expression exceeds the default branch's by "
        f"{EXPRESSION_THRESHOLD:.0%} of the generated tokens at a fluency cost "
        f"<= {FLUENCY_THRESHOLD:g} nat/token with at most {REPETITION_THRESHOLD:.0%} repeated bigrams. Resumable "
        "(stored features with the same settings are skipped); "
        "under torchrun every rank measures its share of the features.")
    parser.add_argument("--stack", required=True, metavar="DIR")
    parser.add_argument("--stage", help="a stage name or index (default: every stage)")
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--features", metavar="LIST", help="comma-separated feature ids of --stage")
    chosen.add_argument("--sample", type=int, metavar="N", help="N random features per stage in the density range")
    chosen.add_argument("--text", metavar="TEXT", help="the --top features of --stage that TEXT activates most (max "
                        "|z| over its tokens, BOS left out: SearchFeatures' ranking of a text query)")
    parser.add_argument("--top", type=int, default=8, metavar="N", help="features taken with --text (default 8)")
    parser.add_argument("--density", default="1e-4:1e-2", metavar="LO:HI",
                        help="dashboard firing-density range for --sample (default 1e-4:1e-2)")
    parser.add_argument("--strengths", nargs="+", default=list(DEFAULT_STRENGTHS), metavar="OP:UNIT:V,...",
                        help="OP add|set, UNIT max (the feature's held-out max) | norm (the hookpoint's mean residual "
                        f"norm; add only), values >= 0 (default: {' '.join(DEFAULT_STRENGTHS)})")
    parser.add_argument("--prompts", metavar="FILE", help="openings, one per line (default: the shipped neutral set)")
    parser.add_argument("--openings", type=int, metavar="N", help="use only the first N openings")
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per continuation (default 16)")
    parser.add_argument("--samples", type=int, default=1, help="sampled continuations per opening besides the "
                        "greedy one (default 1)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled draws and of --sample")
    parser.add_argument("--batch-rows", type=int, default=64, help="continuations per generation batch (default 64)")
    parser.add_argument("--group", type=int, default=4, help="features measured together per rank and round")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser, default_model="the one the stack names")
    parser.set_defaults(handler=run_steerability_command)


def parse_density(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--density must be LO:HI with 0 <= LO <= HI <= 1, got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"--density must be LO:HI with 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def settings_from_args(args: argparse.Namespace):  # -> SteerSettings (torch-importing module, imported lazily)
    from trainer.steerability.measure import SteerSettings
    from trainer.steerability.schedule import parse_strengths

    for flag, value, low in (("--tokens", args.tokens, 1), ("--samples", args.samples, 0),
                             ("--batch-rows", args.batch_rows, 1), ("--group", args.group, 1)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    return SteerSettings(tuple(parse_strengths(args.strengths)), max_new_tokens=args.tokens, samples=args.samples,
                         temperature=args.temperature, seed=args.seed, batch_rows=args.batch_rows)


def run_steerability_command(args: argparse.Namespace) -> int:
    from core.host.loading import load_host_model
    from core.stack.reader import read_stack
    from trainer.steerability.build import (
        describe,
        read_openings,
        resolve_stages,
        run_steerability,
        select,
        text_candidates,
    )
    from trainer.training.distributed import session

    settings = settings_from_args(args)
    density = parse_density(args.density)
    if args.sample is not None and args.sample < 1:
        raise ValueError(f"--sample must be at least 1, got {args.sample}")
    openings = read_openings(args.prompts)
    if args.openings is not None:
        if not 1 <= args.openings <= len(openings):
            raise ValueError(f"--openings must be in [1, {len(openings)}], got {args.openings}")
        openings = openings[:args.openings]
    stack = read_stack(args.stack)
    stages = resolve_stages(stack, args.stage)
    if args.text is not None and len(stages) != 1:
        raise ValueError("--text needs --stage: it ranks one stage's features")
    model = model_config_from_args(args, os.environ, defaults=ModelConfig(name=stack.identity.name))
    with session(os.environ, model.device) as parallel:
        host = load_host_model(model)
        if args.text is not None:
            selections = [text_candidates(host, stack, stages[0], args.text, args.top)]
        else:
            selections = select(stack, stages, features=args.features, sample=args.sample, density=density,
                                seed=args.seed)
        summary = run_steerability(args.stack, host, selections, settings, openings, group=args.group,
                                   parallel=parallel, progress=not args.quiet)
        if parallel.is_main:
            rate = summary["tokens"] / max(summary["seconds"], 1e-9)
            print(f"steerability: {summary['features']} features measured ({summary['skipped']} already stored) in "
                  f"{summary['seconds']:.1f} s, {60 * summary['features'] / max(summary['seconds'], 1e-9):.2f} "
                  f"features/min, {rate:,.0f} generated tokens/s")
            print("\n".join(describe(read_stack(args.stack))))
    return 0
