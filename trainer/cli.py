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
from dataclasses import replace

from core.config import add_model_arguments, model_config_from_args
from trainer.dashboards.cli import add_dashboards, add_explanations
from trainer.data import corpus as corpus_mod
from trainer.data import mixing
from trainer.data.generation_settings import GenerationSettings
from trainer.data.mixing import SPEC_HELP
from trainer.explain.cli import add_explain
from trainer.interop.cli import add_import
from trainer.steerability.cli import add_steerability

PROG = "featurewire-train"
# User errors: reported as one line on stderr with this exit code (argparse uses 2 for bad usage too).
EXIT_USAGE = 2


def _add_corpus_options(parser: argparse.ArgumentParser) -> None:
    """Corpus and split options, shared by every subcommand that reads a corpus."""
    parser.add_argument(
        "--corpus", default=corpus_mod.DEFAULT_SPEC, metavar="SPEC",
        help=f"one source or a weighted mix: {SPEC_HELP} (default: %(default)s)",
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
        "corpus", help="load (or generate) a corpus and print its sources and split sizes",
        description="Load a corpus, split it by document, and print document and character counts per source and "
        "split. A spec with the 'generated' source loads the host model and samples the text once into the cache "
        "(CACHE/corpus/generated-<key>; later runs and `train` with the same model and [corpus.generation] "
        "settings read it), reporting the samples dropped as degenerate.",
        epilog="examples: featurewire-train corpus --corpus generated:0.7,pydocs:0.3 --model default; "
        "featurewire-train corpus --corpus notes/:1,pydocs:1 --json",
    )
    _add_corpus_options(parser)
    generation = parser.add_argument_group(
        "generated source", "how 'generated' is sampled: the [corpus.generation] keys of a training config "
        "(ancestral sampling with temperature and top-p; no top-k)")
    defaults = GenerationSettings()
    for flag, key, kind, text in (
        ("--gen-tokens", "tokens", int, "generated tokens to keep after filtering"),
        ("--temperature", "temperature", float, "sampling temperature, in (0, 2]"),
        ("--top-p", "top_p", float, "nucleus mass, in (0, 1]"),
        ("--max-new-tokens", "max_new_tokens", int, "tokens sampled per document after its opening"),
        ("--min-new-tokens", "min_new_tokens", int, "samples shorter than this are dropped"),
        ("--gen-batch-size", "batch_size", int, "sequences sampled together"),
        ("--bos-share", "bos_share", float, "share of samples started from BOS alone, in [0, 1]"),
        ("--gen-seed", "seed", int, "sampling seed"),
        ("--openings", "openings", str, "JSON openings file {\"openings\": {category: [text, ...]}} "
         "('' : the shipped list)"),
    ):
        generation.add_argument(flag, dest=f"gen_{key}", type=kind, default=getattr(defaults, key),
                                metavar=kind.__name__.upper(), help=f"{text} (default: %(default)r)")
    add_model_arguments(generation, default_model="default; only loaded for 'generated'")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_run_corpus)


def _generation_settings(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(**{key: getattr(args, f"gen_{key}") for key in GenerationSettings().to_dict()
                                 if hasattr(args, f"gen_{key}")})


def _generated_source(args: argparse.Namespace):
    """The generated source on the host model the flags name (fp32 by default, as `train` collects)."""
    import os

    from core.host.loading import load_host_model
    from trainer.data.generated import GeneratedSource
    from trainer.training.config import ModelSection

    model = model_config_from_args(args, os.environ, defaults=ModelSection().to_model_config())
    return GeneratedSource(load_host_model(model), _generation_settings(args), model.cache_dir,
                           progress=not args.json)


def _corpus_report(args: argparse.Namespace) -> dict:
    """Load (and mix) the corpus named by the shared options and split it; counts per source, split and in
    total, and the generation statistics when the spec samples from the host model."""
    settings = _generation_settings(args)  # out-of-range flags fail before any model loads
    source = _generated_source(args) if mixing.uses_generated(args.corpus) else None
    docs, sources = corpus_mod.load_corpus_mix(args.corpus, text_field=args.text_field, generated=source,
                                               mix_seed=args.split_seed)
    splits = corpus_mod.split_documents(
        docs, calibration_fraction=args.calibration_fraction,
        eval_fraction=args.eval_fraction, seed=args.split_seed,
    )
    report = {
        "corpus": args.corpus,
        "split_seed": args.split_seed,
        "sources": sources,
        "splits": {name: corpus_mod.corpus_stats(split) for name, split in splits.items()},
        "total": corpus_mod.corpus_stats(docs),
    }
    if source is not None and source.result is not None:
        report["generated"] = {"cache": str(source.result.directory), "cache_hit": source.result.cache_hit,
                               "settings": settings.to_dict(), "stats": source.result.provenance["stats"]}
    return report


def _format_table(report: dict) -> str:
    rows = [*report["splits"].items(), ("total", report["total"])]
    lines = [f"corpus: {report['corpus']}  (split seed {report['split_seed']})"]
    if len(report["sources"]) > 1:
        lines.append(f"{'source':<24}{'weight':>8}{'share':>8}{'documents':>11}{'characters':>14}")
        lines += [f"{name[-24:]:<24}{s['weight']:>8g}{s['share_actual']:>8.1%}{s['documents']:>11,}"
                  f"{s['characters']:>14,}" for name, s in report["sources"].items()]
    lines.append(f"{'split':<12}{'documents':>11}{'characters':>14}")
    lines += [f"{name:<12}{s['documents']:>11,}{s['characters']:>14,}" for name, s in rows]
    if generated := report.get("generated"):
        st = generated["stats"]
        reasons = ", ".join(f"{k} {v}" for k, v in st["dropped_by_reason"].items())
        lines.append(f"generated: {st['samples']:,} samples, {st['kept_tokens']:,} tokens kept, "
                     f"{st['dropped_share']:.1%} dropped ({reasons}), "
                     f"{st['seconds']:.0f} s at {st['tokens_per_second']:.1f} tokens/s"
                     f"{' (read from the cache)' if generated['cache_hit'] else ''}: {generated['cache']}")
    return "\n".join(lines)


def _run_corpus(args: argparse.Namespace) -> int:
    report = _corpus_report(args)
    print(json.dumps(report, indent=2) if args.json else _format_table(report))
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="collect activations, train a stack, evaluate it and write it",
        description="Train an SAE stack from a TOML config into OUT/stack (resumes from OUT/checkpoint). The config's "
        f"[corpus] spec is one source or a weighted mix: {SPEC_HELP}. The 'generated' source is sampled from the "
        "host model once into the cache, as its [corpus.generation] table says (tokens, temperature, top_p, "
        "max_new_tokens, min_new_tokens, batch_size, bos_share, seed, openings, max_repeat_share, "
        "min_distinct_share; see `featurewire-train corpus --help`); the activation manifests record where the "
        "text came from.",
    )
    parser.add_argument("--config", required=True, metavar="FILE.toml",
                        help="training config (see trainer/configs/)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_arguments(parser, default_model="the config's [model] name")
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import os

    from trainer.training.config import ModelSection, load_config
    from trainer.training.distributed import session
    from trainer.training.loop import format_phases, run_training

    cfg = load_config(args.config)
    # The config's [model] section, then FEATUREWIRE_MODEL/DEVICE/DTYPE/CACHE, then flags: as featurewire-serve.
    model = model_config_from_args(args, os.environ, defaults=cfg.model.to_model_config())
    cfg = replace(cfg, model=ModelSection.from_model_config(model))
    with session(os.environ, cfg.model.device) as parallel:  # a process group only under torchrun
        result = run_training(cfg, args.out, progress=not args.quiet, cache_dir=model.cache_dir, parallel=parallel)
    if parallel.is_main:
        print(format_metrics(result.report["stages"], [s["hookpoint"] for s in result.report["stages"]]))
        print(f"stack: {result.stack_dir}")
        print(format_phases(result.report["phases"]))
    return 0


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a stack on held-out text and record the metrics in it",
        description="Evaluate every stage of a stack (FVE, L0, density, CE/KL splice, multi-layer splice, "
        "decoder redundancy, optionally sparse probing) on the eval split of the corpus it was trained on (or "
        "--corpus) and record the metrics in stack.json. With --compare, evaluate a second stack the same way "
        "and print both side by side.",
    )
    parser.add_argument("--stack", required=True, metavar="DIR")
    parser.add_argument("--compare", metavar="OTHER_DIR", help="a second stack to evaluate and compare with")
    parser.add_argument("--recorded", action="store_true",
                        help="do not evaluate; compare the metrics already recorded in the stacks")
    parser.add_argument("--probing", action="store_true", help="also run the sparse-probing suite")
    parser.add_argument("--model", help="host model (default: the one named in the stack)")
    parser.add_argument("--corpus", metavar="SPEC", help="default: the stack's training corpus")
    parser.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens for reconstruction metrics")
    parser.add_argument("--ce-windows", type=int, default=16, help="held-out windows for CE/KL splices")
    parser.add_argument("--report", metavar="FILE.json", help="also write the full report as JSON here")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from trainer.evaluation.compare import comparison_table, stack_summary
    from trainer.evaluation.evaluate import evaluate_stack_dir

    stacks = [args.stack, *([args.compare] if args.compare else [])]
    if args.recorded and not args.compare:
        raise ValueError("--recorded only makes sense with --compare")
    reports = []
    for i, stack in enumerate(stacks if not args.recorded else []):
        report_path = args.report if i == 0 else None
        reports.append(evaluate_stack_dir(stack, model=args.model, corpus=args.corpus, max_tokens=args.max_tokens,
                                          ce_windows=args.ce_windows, probing=args.probing, report_path=report_path))
    if args.compare:
        left = stack_summary(args.stack, borrow_maps_from=args.compare)
        right = stack_summary(args.compare, borrow_maps_from=args.stack)
        print(comparison_table(left, right))
        return 0
    report = reports[0]
    print(format_metrics(report["stages"], [s["hookpoint"] for s in report["stages"]]))
    from trainer.evaluation.error_metrics import stored_predictor_table

    if table := stored_predictor_table(args.stack):  # the error probes' held-out R² (error_predictors = true)
        print(table)
    if report["metrics"]:
        print(json.dumps(report["metrics"], indent=2))
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write one stage of a stack in another library's format (SAELens)",
        description="Write one stage of a stack as a SAELens SAE (cfg.json + sae_weights.safetensors) that "
        "SAELens loads with SAE.load_from_disk. The stage's input scale is folded into the weights, so SAELens "
        "reads raw activations and gives featurewire's codes and reconstructions. SA-GSAE and residual (ReSAE) "
        "stages have no SAELens equivalent and are refused.",
    )
    parser.add_argument("--to", dest="target", required=True, choices=("saelens",))
    parser.add_argument("--stack", required=True, metavar="DIR")
    parser.add_argument("--stage", metavar="NAME", help="stage to export (default: the only stage of the stack)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for cfg.json + sae_weights.safetensors")
    parser.add_argument("--model-name", metavar="NAME",
                        help="host model name written to cfg.json (default: the one named in the stack)")
    parser.add_argument("--overwrite", action="store_true", help="replace an SAE already in DIR")
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from trainer.interop.export_saelens import export_saelens

    result = export_saelens(args.stack, args.stage, args.out, model_name=args.model_name, overwrite=args.overwrite)
    print(f"stage {result.stage!r} -> SAELens {result.architecture} SAE (input scale {result.input_scale:g} folded "
          f"into the weights): {result.out_dir}")
    return 0


def _add_sweep(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="train every config in a directory and compare the stacks",
        description="Run `train` for each *.toml in CONFIGS (sorted) into OUT/<config name>, then print and "
        "write (OUT/sweep.json) one comparison table. Finished runs are not redone (each resumes).",
    )
    parser.add_argument("--configs", required=True, metavar="DIR", help="directory of training configs")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.training.config import load_config
    from trainer.training.loop import run_training

    configs = sorted(Path(args.configs).glob("*.toml"))
    if not configs:
        raise FileNotFoundError(f"no *.toml configs in {args.configs}")
    rows = []
    for path in configs:
        result = run_training(load_config(path), Path(args.out) / path.stem, progress=not args.quiet)
        for stage in result.report["stages"]:
            rows.append({"run": path.stem, "hookpoint": stage["hookpoint"], "architecture": stage["architecture"],
                         "d_sae": stage["d_sae"], **stage["eval"]})
    (Path(args.out) / "sweep.json").write_text(json.dumps(rows, indent=2))
    print(format_metrics(rows, [f"{r['run']} {r['hookpoint']}" for r in rows]))
    return 0


def _add_export_onnx(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-onnx", help="write one ONNX graph per stage next to a stack, parity-checked",
        description="Export every stage of a stack (or --stage NAME ...) as a self-contained ONNX graph (encode with "
        "top-k or full codes, decode, error norms; ReSAE stages take the previous stage's activation too), check "
        "ONNX Runtime against torch on random and real activations (within 1e-4, fp32), and list the graphs with "
        "their sha256 in stack.json. Nothing is written when a stage fails its check.",
    )
    parser.add_argument("--stack", required=True, metavar="DIR")
    parser.add_argument("--stage", action="append", dest="stages", default=[], metavar="NAME",
                        help="export only this stage (repeat for several; default: every stage)")
    parser.add_argument("--codes", choices=("top_k", "full"), default="top_k",
                        help="graph output: the top-k codes by |value| with k an input, or every code "
                        "(default: %(default)s)")
    parser.add_argument("--random-rows", type=int, default=512, metavar="N",
                        help="random activations per stage for the parity check (default: %(default)s)")
    parser.add_argument("--no-real", action="store_true",
                        help="skip the parity check on real activations (which loads the host model)")
    parser.add_argument("--model", help="host model for real activations (default: the one named in the stack)")
    parser.add_argument("--corpus", metavar="SPEC", help="text for real activations (default: the stack's corpus)")
    parser.add_argument("--real-tokens", type=int, default=512, metavar="N",
                        help="real tokens for the parity check (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random activations (default: %(default)s)")
    parser.set_defaults(handler=_run_export_onnx)


def _run_export_onnx(args: argparse.Namespace) -> int:
    from core.stack.reader import read_stack
    from trainer.interop.onnx_export import export_stack
    from trainer.interop.onnx_parity import real_activations

    if args.random_rows < 2 or args.real_tokens < 1:
        raise ValueError("--random-rows must be at least 2 and --real-tokens at least 1")

    def real():
        return real_activations(read_stack(args.stack), model=args.model, corpus=args.corpus, tokens=args.real_tokens)

    exports = export_stack(args.stack, codes=args.codes, stages=args.stages, real=None if args.no_real else real,
                           random_rows=args.random_rows, seed=args.seed)
    width = max(len(e.name) for e in exports)
    print(f"{'stage':<{width}}  {'MiB':>7}  parity (ONNX Runtime vs torch)")
    for e in exports:
        print(f"{e.name:<{width}}  {len(e.data) / 2**20:>7.2f}  " + "; ".join(f"{r.source}: {r.describe()}"
                                                                            for r in e.parity))
    print(f"stack: {args.stack} ({len(exports)} graphs, codes {args.codes})")
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="run the research comparisons and write docs/results.md with plots",
        description="Train what is missing (runs are reused when their settings match), measure, and write "
        "the report: 1 architectures sweep, 2 ReSAE vs plain, 3 error-norm prediction and ITO, 4 meta-SAE, "
        "5 the demo stack. Plots go to img/ next to OUT.",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="markdown file, e.g. docs/results.md")
    parser.add_argument("--runs", default="runs/report", metavar="DIR", help="where report runs live")
    parser.add_argument("--sections", default="", metavar="LIST",
                        help="comma-separated sections to regenerate (default all); others come from the cache")
    parser.add_argument("--progress", action="store_true", help="progress bars while training")
    parser.add_argument("--no-train", action="store_true",
                        help="report only finished runs; sections name the runs they leave out")
    parser.add_argument("--budgets", default="", metavar="LIST",
                        help="section 1b: comma-separated training budgets in tokens, e.g. 100000,400000,1600000 "
                        "(without it section 1b is kept from the cache)")
    parser.add_argument("--budget-store-tokens", type=int, default=200_000, metavar="N",
                        help="section 1b: tokens collected once for every budget (larger budgets make several "
                        "passes; default 200000)")
    parser.set_defaults(handler=_run_report)


def _budget_list(text: str) -> tuple[int, ...]:
    """`--budgets`: positive integers (underscores allowed), or an error naming the bad entry."""
    budgets = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"--budgets takes comma-separated token counts such as 100000,400000; got {item!r}") \
                from None
        if value < 512:
            raise ValueError(f"--budgets: each budget must be at least one batch of 512 tokens, got {value}")
        budgets.append(value)
    return tuple(dict.fromkeys(budgets))


def _run_report(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from trainer.report import build_report
    from trainer.report.runs import ReportSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    only = [s.strip() for s in args.sections.split(",") if s.strip()] or None
    if args.budget_store_tokens < 512:
        raise ValueError(f"--budget-store-tokens must be at least one batch of 512 tokens, got "
                         f"{args.budget_store_tokens}")
    settings = ReportSettings(runs_dir=Path(args.runs), progress=args.progress, train_missing=not args.no_train,
                              budgets=_budget_list(args.budgets), budget_store_tokens=args.budget_store_tokens)
    out = build_report(Path(args.out), settings, only)
    print(f"report: {out}")
    return 0


METRIC_COLUMNS = ("fve", "l0", "dead_fraction", "cosine", "ce_loss_recovered", "delta_ce", "kl")


def format_metrics(stages: list[dict], hookpoints: list[str]) -> str:
    """A table of the headline metrics per stage."""
    width = max(len(h) for h in hookpoints)
    lines = [f"{'stage':<{width}}" + "".join(f"{c:>19}" for c in METRIC_COLUMNS)]
    for hookpoint, stage in zip(hookpoints, stages, strict=True):
        metrics = stage.get("eval", stage)
        lines.append(f"{hookpoint:<{width}}" + "".join(f"{metrics.get(c, float('nan')):>19.4f}"
                                                       for c in METRIC_COLUMNS))
    return "\n".join(lines)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_corpus, _add_train, _add_eval, add_import, _add_export, _add_sweep, _add_export_onnx, _add_report,
    add_dashboards, add_explanations, add_explain, add_steerability,
)


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
