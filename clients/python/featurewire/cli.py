"""`featurewire`: the command-line client. One subcommand per RPC, readable tables, `--json` for scripts.

    featurewire info
    featurewire decompose "The cat sat on the mat" --top-k 5 --stage blocks.6.hook_resid_post
    featurewire generate "My favourite food is" --set blocks.6.hook_resid_post:123=8@generated --with-default
    featurewire feature blocks.6.hook_resid_post 123          (or: feature STACK STAGE ID)
    featurewire search "The cat sat on the mat" --span 4:7    (or --token-text " cat", --explanation "animals")
    featurewire features blocks.6.hook_resid_post --max-density 0 --all   (the dead features)
    featurewire score "The cat sat on the mat" --splice blocks.6.hook_resid_post

Edits: `--set/--add/--scale STAGE:FEATURE=VALUE`, `--clamp STAGE:FEATURE=LO:HI` (either bound may be
empty), `--ablate STAGE:FEATURE`, each with an optional `@POSITIONS` (prompt, generated, all, N,
START:END). Exit status: 0 ok, 2 usage, 1 when the server answers an error (its status name and message
go to stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from featurewire import render
from featurewire._transport import DEFAULT, DEFAULT_TARGET
from featurewire.builders import Condition, Intervention, Positions
from featurewire.client import Client
from featurewire.errors import FeaturewireError
from featurewire.events import ConditionFired, Finished, Started, Token

EDIT_FLAGS = ("set", "add", "scale", "clamp", "ablate")


def _feature_ref(text: str) -> tuple[str, int]:
    stage, colon, feature = text.rpartition(":")
    if not colon or not stage or not feature.strip().isdigit():
        raise ValueError(f"{text!r}: expected STAGE:FEATURE, e.g. blocks.6.hook_resid_post:123")
    return stage, int(feature)


def parse_edit(op: str, spec: str, default_positions: Positions | None = None) -> Intervention:
    """`STAGE:FEATURE=VALUE[@POSITIONS]` (CLAMP: `=LO:HI`, ABLATE: no value) -> Intervention."""
    body, at, where = spec.rpartition("@") if "@" in spec else (spec, "", "")
    positions = Positions.parse(where) if at else default_positions
    if op == "ablate":
        return Intervention.ablate(*_feature_ref(body), positions=positions)
    ref, equals, value = body.rpartition("=")
    if not equals:
        raise ValueError(f"--{op} {spec!r}: expected STAGE:FEATURE={'LO:HI' if op == 'clamp' else 'VALUE'}")
    stage, feature = _feature_ref(ref)
    try:
        if op == "clamp":
            lo, colon, hi = value.partition(":")
            if not colon:
                raise ValueError
            return Intervention.clamp(stage, feature, float(lo) if lo.strip() else float("-inf"),
                                      float(hi) if hi.strip() else float("inf"), positions=positions)
        return getattr(Intervention, op)(stage, feature, float(value), positions=positions)
    except ValueError:
        raise ValueError(f"--{op} {spec!r}: the value must be a number{' pair LO:HI' if op == 'clamp' else ''}") \
            from None


def parse_stop_condition(spec: str) -> Condition:
    """`STAGE:FEATURE>THRESHOLD` or `STAGE:FEATURE<THRESHOLD` -> a STOP condition."""
    for sign, build in ((">", Condition.above), ("<", Condition.below)):
        ref, found, threshold = spec.rpartition(sign)
        if found:
            try:
                return build(*_feature_ref(ref), float(threshold)).stop()
            except ValueError:
                break
    raise ValueError(f"--stop-when {spec!r}: expected STAGE:FEATURE>THRESHOLD or STAGE:FEATURE<THRESHOLD")


def _edits(args: argparse.Namespace) -> list[Intervention]:
    default = Positions.parse(args.positions) if getattr(args, "positions", None) else None
    return [parse_edit(op, spec, default) for op in EDIT_FLAGS for spec in getattr(args, op) or ()]


def _print(line: str = "") -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------------------------- commands


def cmd_info(client: Client, args: argparse.Namespace) -> None:
    info = client.info(timeout=args.timeout)
    for line in [render.to_json(info)] if args.json else render.info_lines(info):
        _print(line)


def cmd_stacks(client: Client, args: argparse.Namespace) -> None:
    stacks = client.stacks(timeout=args.timeout)
    if args.json:
        _print(render.to_json({"stacks": [render.json.loads(render.to_json(s)) for s in stacks]}))
        return
    for line in render.stacks_lines(stacks) or ["no stacks loaded"]:
        _print(line)


def cmd_decompose(client: Client, args: argparse.Namespace) -> None:
    always: dict[str, list[int]] = {}
    for ref in args.feature or ():
        stage, feature = _feature_ref(ref)
        always.setdefault(stage, []).append(feature)
    stream = client.decompose(args.text, stages=args.stage, top_k=args.top_k, include_error=not args.no_error,
                              always=always, stack=args.stack, timeout=args.timeout)
    with stream:
        header = stream.header()
        for line in [render.to_json(header, type="header")] if args.json else render.decompose_header(header):
            _print(line)
        for token in stream:
            for line in [render.to_json(token, type="token")] if args.json else render.token_rows(token, args.top_k):
                _print(line)


def cmd_generate(client: Client, args: argparse.Namespace) -> None:
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "stop": args.stop or (), "ignore_eos": args.ignore_eos}
    conditions = [parse_stop_condition(s) for s in args.stop_when or ()]
    stream = client.generate(args.prompt, interventions=_edits(args), conditions=conditions,
                             with_default=args.with_default, stack=args.stack, timeout=args.timeout, **sampling)
    kinds = {Started: "started", Token: "token", ConditionFired: "condition", Finished: "finished"}
    with stream:
        for event in stream:
            if args.json:
                _print(render.to_json(event, type=kinds[type(event)]))
            elif isinstance(event, Started):
                print(args.prompt, end="", flush=True)
            elif isinstance(event, Token) and event.branch == "STEERED":
                print(event.text, end="", flush=True)
        if args.json:
            return
        result = stream.collect()
    _print()
    _print()
    if result.default_finished is not None:
        for line in render.side_by_side(result.text, result.default_text or ""):
            _print(line)
    for fired in result.conditions:
        _print(f"[condition {fired.condition_id} fired at position {fired.position} on {fired.branch.lower()} "
               f"(value {fired.value:+.3g}): {fired.action}]")
    finishes = [result.finished] + ([result.default_finished] if result.default_finished else [])
    _print(" ".join(render.finish_line(f) for f in finishes) + f" seed {result.seed}")


def feature_target(ref: Sequence[str]) -> tuple[str, str, int]:
    """`STAGE ID` or `STACK STAGE ID` -> (stack, stage, id); stack "", "-" or "default" = the default stack."""
    if len(ref) not in (2, 3) or not ref[-1].strip().isdigit():
        raise ValueError(f"feature {' '.join(ref)!r}: expected STAGE ID or STACK STAGE ID (ID a number)")
    *stack, stage, feature = ref
    name = stack[0] if stack else ""
    return ("" if name in ("-", "default") else name), stage, int(feature)


def cmd_feature(client: Client, args: argparse.Namespace) -> None:
    stack, stage, number = feature_target(args.ref)
    feature = client.feature(stack, stage, number, top_n=args.top_n, timeout=args.timeout)
    for line in [render.to_json(feature)] if args.json else render.feature_lines(feature):
        _print(line)


def _span(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    start, colon, end = text.partition(":")
    if not colon or not start.strip().isdigit() or not end.strip().isdigit():
        raise ValueError(f"--span {text!r}: expected START:END, character offsets with END excluded")
    return int(start), int(end)


def _pages(fetch: Callable[[str], Any], every: bool) -> Any:
    """The first page, and with `every` each following one (the server's next_page_token) until the last."""
    token = ""
    while True:
        page = fetch(token)
        yield page
        token = page.next_page_token
        if not every or not token:
            return


def cmd_search(client: Client, args: argparse.Namespace) -> None:
    stages = [name for item in args.stages or () for name in item.split(",") if name]
    token = args.token_text if args.token_text is not None else args.token_id
    for page in _pages(lambda page_token: client.search_features(
            args.text, span=_span(args.span), token=token, explanation=args.explanation, stages=stages,
            reduce=args.reduce, direction="suppresses" if args.suppresses else "promotes", stack=args.stack,
            page_size=args.page_size, page_token=page_token or args.page_token, timeout=args.timeout), args.all):
        for line in [render.to_json(page)] if args.json else render.search_lines(page):
            _print(line)


def cmd_features(client: Client, args: argparse.Namespace) -> None:
    for page in _pages(lambda page_token: client.list_features(
            args.stage, min_density=args.min_density, max_density=args.max_density, sort=args.sort,
            descending=args.descending, stack=args.stack, page_size=args.page_size, steerable_only=args.steerable,
            page_token=page_token or args.page_token, timeout=args.timeout), args.all):
        for line in [render.to_json(page)] if args.json else render.feature_list_lines(page):
            _print(line)


def cmd_score(client: Client, args: argparse.Namespace) -> None:
    result = client.score(args.text, interventions=_edits(args), splice=args.splice or (), stack=args.stack,
                          timeout=args.timeout)
    for line in [render.to_json(result)] if args.json else render.score_lines(result):
        _print(line)


def cmd_tokenize(client: Client, args: argparse.Namespace) -> None:
    tokens = client.tokenize(args.text, add_special_tokens=False if args.no_special else None, timeout=args.timeout)
    for line in [render.to_json(tokens)] if args.json else render.tokens_lines(tokens):
        _print(line)


# --------------------------------------------------------------------------------------------- parser


def _common() -> argparse.ArgumentParser:
    """Connection flags, accepted before or after the subcommand (SUPPRESS keeps a later default from
    overwriting an earlier value)."""
    common = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    common.add_argument("--target", default=s, help=f"server address, or dns:///host:port to balance over replicas "
                                                    f"(env FEATUREWIRE_TARGET; default {DEFAULT_TARGET})")
    common.add_argument("--token", default=s, help="bearer token (env FEATUREWIRE_TOKEN)")
    common.add_argument("--tls", action="store_true", default=s, help="connect with TLS (system roots)")
    common.add_argument("--ca-cert", default=s, metavar="PEM", help="TLS with this root certificate")
    common.add_argument("--timeout", type=float, default=s, metavar="S", help="deadline of the call in seconds")
    common.add_argument("--json", action="store_true", default=s, help="JSON output (JSON lines for streams)")
    return common


def _edit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="STAGE:F=V[@POS]", help="pin feature F to V")
    p.add_argument("--add", action="append", metavar="STAGE:F=V[@POS]", help="add V to feature F")
    p.add_argument("--scale", action="append", metavar="STAGE:F=X[@POS]", help="multiply feature F by X")
    p.add_argument("--clamp", action="append", metavar="STAGE:F=LO:HI[@POS]", help="clamp feature F to [LO, HI]")
    p.add_argument("--ablate", action="append", metavar="STAGE:F[@POS]", help="zero feature F")
    p.add_argument("--positions", metavar="POS", help="default positions of the edits: prompt, generated, all, N, "
                                                      "START:END (default: all)")


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=0, help="results per page (0 = the server's default)")
    p.add_argument("--page-token", default="", help="continue from a page (the token a previous page printed)")
    p.add_argument("--all", action="store_true", help="every page, one after the other")
    p.add_argument("--stack", default="")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="featurewire", parents=[common],
                                     description="Client of a featurewire server: SAE features, steering, scoring.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[Client, argparse.Namespace], None], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    add("info", cmd_info, "the server's model, stacks, capabilities and limits")
    add("stacks", cmd_stacks, "the loaded stacks and their stages")
    p = add("decompose", cmd_decompose, "features per token and stage, with actual and predicted error norms")
    p.add_argument("text")
    p.add_argument("--stage", action="append", help="a stage to report (repeatable; default: every stage)")
    p.add_argument("--top-k", type=int, default=5, help="features per token and stage (default 5)")
    p.add_argument("--feature", action="append", metavar="STAGE:F", help="always report this feature (repeatable)")
    p.add_argument("--no-error", action="store_true", help="skip the error norms")
    p.add_argument("--stack", default="", help="stack name (default: the server's default stack)")
    p = add("generate", cmd_generate, "a continuation, streamed, optionally steered and beside the default one")
    p.add_argument("prompt")
    _edit_flags(p)
    p.add_argument("--stop-when", action="append", metavar="STAGE:F>T", help="stop when feature F crosses T "
                                                                             "(> or <; repeatable)")
    p.add_argument("--with-default", action="store_true", help="also generate the unsteered continuation")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stack", default="")
    p = add("feature", cmd_feature, "one feature: decoder norm, logit-lens tokens and its dashboard (density per "
            "sign, examples, neighbours), explanation and meta-latents when the stack has them")
    p.add_argument("ref", nargs="+", metavar="[STACK] STAGE ID",
                   help='the stage and feature id, optionally after a stack name ("" or - for the default)')
    p.add_argument("--top-n", type=int, default=0, help="logit-lens tokens each way (0 = 10)")
    p = add("search", cmd_search, "features a text activates, whose logit lens promotes a token, or whose "
            "explanation has some words")
    p.add_argument("text", nargs="?", help="rank features by their activation on this text")
    p.add_argument("--span", metavar="START:END", help="only the tokens overlapping these characters of the text")
    p.add_argument("--reduce", choices=("max", "mean"), default="max", help="over the tokens (default max)")
    p.add_argument("--token-text", metavar="TOKEN", help="rank by the logit lens of this one-token string (--token "
                                                         "is the bearer token)")
    p.add_argument("--token-id", type=int, metavar="ID", help="rank by the logit lens of this token id")
    p.add_argument("--suppresses", action="store_true", help="with a token: the features lowering it most")
    p.add_argument("--explanation", metavar="WORDS", help="rank by the words the features' explanations contain")
    p.add_argument("--stages", action="append", metavar="A,B", help="stages to search (default: every stage)")
    _paging(p)
    p = add("features", cmd_features, "a stage's features from its dashboard, filtered by density and sorted")
    p.add_argument("stage")
    p.add_argument("--min-density", type=float, metavar="D", help="keep density >= D (default 0)")
    p.add_argument("--max-density", type=float, metavar="D", help="keep density <= D (default 1; 0: dead features)")
    p.add_argument("--sort", choices=("density", "max", "label_f1", "steering", "output_score", "explanation_score"),
                   default="density",
                   help="order (default density; label_f1: the best token-label F1; steering: the largest measured "
                   "expression lift within the fluency bound; output_score: the measured output score; the last two "
                   "list measured features only; explanation_score: the LLM explanation's detection score, scored "
                   "features only)")
    p.add_argument("--steerable", action="store_true", help="only features whose measured verdict says they steer")
    p.add_argument("--descending", action="store_true", help="largest first")
    _paging(p)
    p = add("score", cmd_score, "teacher-forced CE of a text, clean and edited or spliced, and their KL")
    p.add_argument("text")
    p.add_argument("--splice", action="append", metavar="STAGE", help="replace a stage by its reconstruction")
    _edit_flags(p)
    p.add_argument("--stack", default="")
    p = add("tokenize", cmd_tokenize, "the token ids and strings of a text")
    p.add_argument("text")
    p.add_argument("--no-special", action="store_true", help="do not add special tokens such as BOS")
    return parser


def _client(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> Client:
    target = getattr(args, "target", None) or environ.get("FEATUREWIRE_TARGET") or DEFAULT_TARGET
    token = getattr(args, "token", None) or environ.get("FEATUREWIRE_TOKEN") or None
    ca = getattr(args, "ca_cert", None)
    return Client(target, token=token, tls=ca or bool(getattr(args, "tls", False)))


def main(argv: Sequence[str] | None = None, *, environ: Any = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2): a code, not an exception, for in-process use
        return int(exit_.code or 0)
    args.json = getattr(args, "json", False)
    args.timeout = getattr(args, "timeout", DEFAULT)
    try:
        with _client(args, os.environ if environ is None else environ) as client:
            args.handler(client, args)
    except ValueError as error:  # a malformed --set/--clamp/--stop-when/positions
        parser.print_usage(sys.stderr)
        print(f"featurewire: error: {error}", file=sys.stderr)
        return 2
    except FeaturewireError as error:
        print(f"featurewire: {error.status}: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `| head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
