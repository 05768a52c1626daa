"""The `explain` subcommand of featurewire-train (registered by trainer/cli.py); torch is imported in the handler."""

from __future__ import annotations

import argparse
import json
import os
import sys

from core.config import ModelConfig


def add_explain(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain", help="explain features with an LLM behind an OpenAI-compatible endpoint, and score them",
        description="For each chosen feature (its positive side), show an LLM its dashboard examples (top and "
        "quantile-sampled, firing tokens marked <<like this>>) and store the one-line answer in the stack's "
        "explanations with detection and fuzzing scores (balanced accuracy on held-out and non-activating examples, "
        "with their counts), the explainer and scorer models, the prompt version and the date. Features already "
        "explained with the same model, prompt version and examples are skipped, so an interrupted run resumes.")
    parser.add_argument("--stack", required=True, metavar="DIR")
    parser.add_argument("--endpoint", required=True, metavar="URL",
                        help="the API base, e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 (Ollama)")
    parser.add_argument("--model", required=True, metavar="NAME", help="the explainer model's name at the endpoint")
    parser.add_argument("--scorer-model", metavar="NAME",
                        help="the scorer's model at the same endpoint (default: --model)")
    parser.add_argument("--api", choices=("chat", "completions"), default="chat",
                        help="chat/completions (default) or completions (base models)")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    parser.add_argument("--stage", action="append", metavar="S", help="a stage name (repeat; default: every stage)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--features", metavar="LIST", help="comma-separated feature ids (default: every one that fired)")
    which.add_argument("--sample", type=int, metavar="N", help="N random features per stage among those that fired")
    parser.add_argument("--concurrency", type=int, default=4, help="features whose requests run at once (default 4)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--retries", type=int, default=4, help="retries after a 429 or 5xx, with back-off (default 4)")
    parser.add_argument("--device", metavar="DEVICE", help="where the host model reads the non-activating examples "
                        "(default: FEATUREWIRE_DEVICE, else the best available); the host model is the one the "
                        "stack names (--model here is the explainer)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_explain)


def parse_features(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--features must be comma-separated feature ids, e.g. 3,17,42; got {text!r}") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"--features must list non-negative feature ids, got {text!r}")
    return ids


def run_explain(args: argparse.Namespace) -> int:
    from core.host.loading import load_host_model
    from core.stack.reader import read_stack
    from trainer.explain.endpoint import Endpoint, EndpointConfig, EndpointError, Usage
    from trainer.explain.run import explain_stack

    if args.concurrency < 1 or (args.sample is not None and args.sample < 1) or args.timeout <= 0 or args.retries < 0:
        raise ValueError("--concurrency and --sample must be at least 1, --timeout positive, --retries >= 0")
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    model = ModelConfig.from_env(os.environ, name=read_stack(args.stack).identity.name, device=args.device)
    host = load_host_model(model)
    usage = Usage()
    explainer = Endpoint(EndpointConfig(args.endpoint, args.model, args.api, key, args.timeout, args.retries), usage)
    scorer = explainer if not args.scorer_model else Endpoint(EndpointConfig(
        args.endpoint, args.scorer_model, args.api, key, args.timeout, args.retries), usage)
    try:
        summary = explain_stack(args.stack, host, explainer, scorer, stages=args.stage,
                                features=parse_features(args.features) if args.features else None,
                                sample=args.sample, concurrency=args.concurrency, progress=not args.quiet)
    except EndpointError as exc:  # what finished before it is stored already
        print(f"featurewire-train explain: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
