"""`featurewire-serve` / `python -m service`: operator commands for the host model runtime.

Heavy imports (torch, transformers) happen inside the commands, after logging is configured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

from core.config import ModelConfig, add_model_arguments, model_config_from_args
from core.errors import ServiceError
from service.config import ServerConfig


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return model_config_from_args(args, os.environ)


def cmd_hookpoints(args: argparse.Namespace) -> int:
    """Print the model summary and every hookpoint with its dimension."""
    from core.host.loading import load_host_model

    host = load_host_model(_model_config(args))
    summary = host.summary()
    points = [{"name": p.name, "dim": p.dim, "module": p.module_path} for p in host.hookpoints]
    if args.json:
        print(json.dumps({"model": asdict(summary), "hookpoints": points}, indent=2))
        return 0
    print(f"model       {summary.name} ({summary.model_type})")
    print(f"layers      {summary.num_layers}   d_model {summary.d_model}   vocab {summary.vocab_size}")
    print(f"parameters  {summary.num_parameters:,}   dtype {summary.dtype}   device {summary.device}")
    print(f"hookpoints  {summary.num_hookpoints}")
    width = max(len(p["name"]) for p in points)
    for point in points:
        print(f"  {point['name']:<{width}}  d={point['dim']:<5} {point['module']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt (no decomposition, no interventions) and print the continuation."""
    from core.host.host_model import SamplingParams
    from core.host.loading import load_host_model

    host = load_host_model(_model_config(args))
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )
    new_ids, _ = host.generate(host.encode(args.prompt), sampling)
    text = host.decode(new_ids[0])
    print(json.dumps({"prompt": args.prompt, "completion": text}) if args.json else args.prompt + text)
    return 0


def cmd_tour(args: argparse.Namespace) -> int:
    from service.tour import run_tour

    return run_tour(_model_config(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(args.stack, _model_config(args), keep_serving=args.keep_serving, concept=args.concept)


def _serve_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--stack", action="append", dest="stacks", metavar="DIR",
        help="SAE stack directory to serve; repeat for several, the first is the default (env FEATUREWIRE_STACKS)")
    add("--host", help="address to bind (env FEATUREWIRE_HOST; default [::])")
    add("--port", type=int, help="gRPC port, 0 = any free port (env FEATUREWIRE_PORT; default 50051)")
    add("--metrics-port", type=int, help="Prometheus port, 0 = off (env FEATUREWIRE_METRICS_PORT; default 9090)")
    add("--http-port", type=int, help="HTTP/JSON gateway port (POST /v1/<Method>, SSE streams, /healthz, /readyz), "
        "0 = any free port; off unless set (env FEATUREWIRE_HTTP_PORT; docs/api.md)")
    add("--tls-cert", help="PEM certificate chain; TLS is on with --tls-key (env FEATUREWIRE_TLS_CERT)")
    add("--tls-key", help="PEM private key (env FEATUREWIRE_TLS_KEY)")
    add("--auth-token-file", help="file holding the bearer token every call must carry "
        "(env FEATUREWIRE_AUTH_TOKEN_FILE or FEATUREWIRE_AUTH_TOKEN)")
    add("--max-new-tokens", type=int, help="cap on Generate's max_new_tokens (env FEATUREWIRE_MAX_NEW_TOKENS)")
    add("--queue-size", type=int, help="requests that may wait for the engine (env FEATUREWIRE_QUEUE_SIZE)")
    add("--max-batch-size", type=int,
        help="requests run at once and sequences per forward pass (env FEATUREWIRE_MAX_BATCH_SIZE; default 16)")
    add("--max-batch-tokens", type=int,
        help="tokens per forward pass (env FEATUREWIRE_MAX_BATCH_TOKENS; default 4096)")
    add("--threads", type=int, help="CPU threads of the model's torch work, 0 = chosen from the machine: "
        "OMP_NUM_THREADS or the cores, capped by CPU affinity and cgroup quota (env FEATUREWIRE_THREADS; default 0)")
    add("--drain-grace", type=float, dest="drain_grace_s",
        help="seconds in-flight calls get after SIGTERM (env FEATUREWIRE_DRAIN_GRACE_S)")
    add("--no-self-check", action="store_true", help="serve stacks without checking FVE/L0 on calibration text")
    add("--no-model", action="store_true",
        help="activation-only mode: load no host model (nor torch) and serve EncodeActivations, GetServerInfo and "
        "ListStacks through the stacks' ONNX graphs (featurewire-train export-onnx); --device picks CPU or CUDA")
    add("--log-level", help="DEBUG | INFO | WARNING | ERROR (env FEATUREWIRE_LOG_LEVEL; default INFO)")
    add("--chat-template", metavar="FILE", help="Jinja chat template for the OpenAI-compatible API's chat completions "
        "on --http-port (the model's own when it has one; a base model has none) (env FEATUREWIRE_CHAT_TEMPLATE)")


def _server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig.from_env(
        os.environ, stacks=tuple(args.stacks) if args.stacks else None, host=args.host, port=args.port,
        metrics_port=args.metrics_port, http_port=args.http_port, tls_cert=args.tls_cert, tls_key=args.tls_key,
        auth_token_file=args.auth_token_file, max_new_tokens=args.max_new_tokens, queue_size=args.queue_size,
        max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens, threads=args.threads,
        drain_grace_s=args.drain_grace_s, self_check=False if args.no_self_check else None,
        log_level=args.log_level, chat_template=args.chat_template,
    )


def _configure_serve_logging(level: str, verbose: bool) -> None:
    """Every record carries the request id of the RPC that produced it (or "-")."""
    from service.interceptors import RequestIdFilter

    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else level)
    for handler in root.handlers:
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the gRPC API until SIGTERM/SIGINT, then drain and exit 0."""
    import asyncio

    model_config, server_config = _model_config(args), _server_config(args)
    _configure_serve_logging(server_config.log_level, args.verbose)
    if args.no_model:
        return asyncio.run(_serve_without_model(args, model_config, server_config))
    # Before torch loads OpenMP (it reads this once): idle OpenMP threads sleep at once instead of spinning. On
    # a machine whose cores are busy, spinning helpers made 2-thread generation 10-30x slower (docs/benchmarks.md,
    # "Steered generation and threads"); an operator's own OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from service.server import serve  # torch and transformers: only for the full mode

    return asyncio.run(serve(model_config, server_config))


async def _serve_without_model(args: argparse.Namespace, model_config: ModelConfig, server_config: ServerConfig) -> int:
    """The activation-only server; imports nothing that loads torch."""
    from service.activation_server import serve_activation_only

    if args.model:
        raise ValueError("--no-model serves without a host model; leave out --model")
    if not server_config.stacks:
        raise ValueError("--no-model needs at least one --stack DIR (with ONNX graphs: featurewire-train export-onnx)")
    return await serve_activation_only(server_config, device=model_config.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurewire-serve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    hookpoints = commands.add_parser("hookpoints", help="print the model summary and its hookpoints")
    add_model_arguments(hookpoints)
    hookpoints.add_argument("--json", action="store_true", help="print JSON")
    hookpoints.set_defaults(run=cmd_hookpoints)

    generate = commands.add_parser("generate", help="continue a prompt with the host model")
    add_model_arguments(generate)
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--json", action="store_true", help="print JSON")
    generate.set_defaults(run=cmd_generate)

    serve = commands.add_parser("serve", help="serve the gRPC API (health, reflection, Prometheus metrics)")
    add_model_arguments(serve)
    _serve_args(serve)
    serve.set_defaults(run=cmd_serve)

    tour = commands.add_parser("tour", help="tour of the host model runtime on the embedded default model")
    add_model_arguments(tour)
    tour.set_defaults(run=cmd_tour)

    demo = commands.add_parser("demo", help="serve a stack, then decompose, steer and read metrics as a client")
    add_model_arguments(demo)
    demo.add_argument("--stack", required=True, metavar="DIR", help="the stack to serve (make demo builds one)")
    demo.add_argument("--concept", default=None, metavar="TEXT",
                      help="the concept text whose SearchFeatures matches the demo steers with (default: the demo's)")
    demo.add_argument("--keep-serving", action="store_true",
                      help="after the demo, keep the server (and the explorer) up until Ctrl-C")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except (ServiceError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
