"""The `import` subcommand of featurewire-train (trainer/cli.py only registers it); torch loads lazily so `--help`
stays instant."""

from __future__ import annotations

import argparse
import os
import sys

from core.config import add_model_arguments, model_config_from_args
from core.stack.dashboards import LABEL_LIMIT

DESCRIPTION = """\
Import SAEs saved by SAELens or EleutherAI sparsify into one featurewire stack for the host model.

Name one SAE with --from and either a directory (SRC) or a release and sae id (--release R --sae-id ID), and/or
any number with repeated --sae SPEC; all of them become the stages of one stack, in forward order (layer, then
resid_pre < attn_out < mlp_out < resid_post). They must share one width (d_model) and, as far as their
configs name it, one host model; each is checked against the host's hookpoint.

A release is looked up in featurewire's table of SAELens releases (the error lists them) or, when it is not
there, taken as a Hugging Face repository id (ORG/NAME) whose folder --sae-id holds the files. Files are read
from the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), so an import works
offline when they are there; --download fetches missing ones from the hub.

--explorer-ready also evaluates the stack on held-out text (metrics the server's self-check reads) and builds
every feature's dashboard with its token label, so `featurewire-serve` and the explorer can show it at once."""

METRICS = ("fve", "l0", "dead_fraction", "delta_ce", "kl")  # printed per stage after --explorer-ready
SPEC_HELP = ("one more SAE, as comma-separated KEY=VALUE: from=saelens|sparsify (default saelens), then dir=PATH or "
             "release=R,id=ID, optionally hookpoint=H, input_scale=S, revision=REV; repeat for several, e.g. "
             "--sae from=sparsify,dir=out/layers.3 --sae release=gemma-scope-2b-pt-res-canonical,"
             "id=layer_20/width_16k/canonical")


def add_import(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import", help="import SAELens / sparsify SAEs (directories or releases) into one stack",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", choices=("saelens", "sparsify"),
                        help="file format of SRC or of the release's folder (SAELens: cfg.json + "
                        "sae_weights.safetensors; sparsify: cfg.json + sae.safetensors)")
    parser.add_argument("src", metavar="SRC", nargs="?", help="directory holding the saved SAE")
    parser.add_argument("--release", metavar="R", help="SAELens release name, or a Hugging Face repository id")
    parser.add_argument("--sae-id", metavar="ID", help="the SAE inside the release (its folder for a repository id)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit of the release (default: main)")
    parser.add_argument("--hookpoint", help="canonical hookpoint of that SAE, e.g. blocks.6.hook_resid_post "
                        "(default: the one it names; sparsify layers.N -> blocks.N.hook_resid_post)")
    parser.add_argument("--input-scale", type=float, help="constant that SAE expects its input scaled by")
    parser.add_argument("--sae", action="append", default=[], metavar="SPEC", help=SPEC_HELP)
    parser.add_argument("--download", action="store_true",
                        help="fetch release files missing from the Hugging Face cache (needs network access)")
    parser.add_argument("--out", required=True, metavar="DIR", help="stack directory to write")
    parser.add_argument("--name", help="stack name (default: SOURCE-HOOKPOINT, or imported-N-saes)")
    parser.add_argument("--overwrite", action="store_true", help="replace a stack already in DIR")
    ready = parser.add_argument_group("explorer-ready")
    ready.add_argument("--explorer-ready", action="store_true",
                       help="also record evaluation metrics and build dashboards with token labels")
    ready.add_argument("--corpus", metavar="SPEC", help="held-out text for both (default: the built-in corpus)")
    ready.add_argument("--eval-tokens", type=int, default=8192, metavar="N",
                       help="held-out tokens for reconstruction metrics (default: %(default)s)")
    ready.add_argument("--ce-windows", type=int, default=16, metavar="N",
                       help="held-out windows for the CE/KL splice (default: %(default)s)")
    ready.add_argument("--dashboard-tokens", type=int, default=50_000, metavar="N",
                       help="held-out tokens for the dashboards (default: %(default)s)")
    ready.add_argument("--label-tokens", type=int, default=8, metavar="N",
                       help=f"most tokens in a feature's label (0 to {LABEL_LIMIT}; 0: no labels; default: "
                       "%(default)s)")
    ready.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser, default_model="default")
    parser.set_defaults(handler=run_import)


def sources_from_args(args: argparse.Namespace) -> list:
    """The SAEs the flags name: the --from one (SRC or --release), then each --sae, in the order given."""
    from trainer.interop.compose import SAESource, parse_sae_spec

    single = args.src is not None or args.release is not None or args.sae_id is not None
    if single and args.source is None:
        raise ValueError("name the file format of SRC or --release with --from saelens or --from sparsify")
    if args.src is not None and args.release is not None:
        raise ValueError("give either SRC (a directory) or --release R --sae-id ID, not both")
    if not single and (args.source is not None or args.hookpoint or args.input_scale is not None):
        raise ValueError("--from, --hookpoint and --input-scale describe SRC or --release; name it, or use --sae")
    specs = [SAESource(args.source, directory=args.src, release=args.release, sae_id=args.sae_id,
                       hookpoint=args.hookpoint, input_scale=args.input_scale, revision=args.revision)
             ] if single else []
    specs += [parse_sae_spec(text) for text in args.sae]
    if not specs:
        raise ValueError("name an SAE: --from saelens SRC, --from saelens --release R --sae-id ID, or --sae SPEC")
    return specs


def run_import(args: argparse.Namespace) -> int:
    from trainer.interop.compose import ExplorerSettings, compose_stack, make_explorer_ready

    if not 0 <= args.label_tokens <= LABEL_LIMIT:
        raise ValueError(f"--label-tokens must be in [0, {LABEL_LIMIT}], got {args.label_tokens}")
    settings = ExplorerSettings(corpus=args.corpus, eval_tokens=args.eval_tokens, ce_windows=args.ce_windows,
                                dashboard_tokens=args.dashboard_tokens, label_tokens=args.label_tokens)
    model = model_config_from_args(args, os.environ)
    stack_dir = compose_stack(sources_from_args(args), model=model, out_dir=args.out, name=args.name,
                              download=args.download, overwrite=args.overwrite)
    lines = [f"stack: {stack_dir}"]
    if args.explorer_ready:
        from core.stack.reader import read_stack
        from trainer.dashboards.build import describe

        report = make_explorer_ready(stack_dir, model, settings, progress=not args.quiet)
        stack = read_stack(stack_dir)
        for stage, metrics in zip(stack.stages, report["stages"], strict=True):
            lines.append(f"{stage.name}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in METRICS if k in metrics))
        lines += describe(stack)
    sys.stdout.write("\n".join(lines) + "\n")  # the command's report (this module keeps print() out)
    return 0
