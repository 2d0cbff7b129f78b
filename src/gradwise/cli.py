"""The ``gradwise`` command: train, resume, eval, recipes, optimizers.

A user's mistake (a bad key, a missing file, a corrupt checkpoint) prints one
line on stderr and exits with status 2; Ctrl-C during training checkpoints
and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from gradwise.errors import GradwiseError, GradwiseWarning

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

_TRAIN_HELP = """Train a recipe into runs/<name>-<timestamp>/ (or runs/<name>/ when name= is given).

RECIPE is a YAML file or the name of a bundled recipe (see `gradwise recipes`).
Any config field can be overridden as key.path=value; resume=RUN_DIR continues
an interrupted run with the same config.

examples:
  gradwise train digits-cnn
  gradwise train my.yaml optim.name=adamw optim.lr=3e-3 schedule.name=cosine schedule.warmup_steps=50
  gradwise train my.yaml batch.size=full optim.name=gd stop.epochs=200
  gradwise train my.yaml resume=runs/my-20261125-120000
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwise",
        description="Train, compare and measure PyTorch training strategies; every strategy is a YAML switch.",
        epilog="example: gradwise train digits-cnn   (then open runs/digits-cnn-*/plots/)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    train = sub.add_parser("train", help="train a recipe", description=_TRAIN_HELP, formatter_class=fmt)
    train.add_argument("recipe", help="recipe YAML file or bundled recipe name")
    train.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes on this machine (torch's elastic launcher); DDP, or FSDP with distributed.strategy=fsdp",
    )

    resume = sub.add_parser(
        "resume",
        help="continue an interrupted run",
        formatter_class=fmt,
        description="Continue RUN_DIR from its last checkpoint with its saved config; bit-exact on CPU.\n\n"
        "example:\n  gradwise resume runs/digits-cnn-20261125-120000\n"
        "  gradwise resume runs/digits-cnn-20261125-120000 stop.epochs=40   # train longer\n"
        "  gradwise resume runs/gpt-python-20261125-120000 --nproc 4 distributed.strategy=fsdp   # scale out\n"
        "  gradwise resume runs/digits-cnn-20261125-120000 --from-checkpoint last optim.lr=1e-4   # after divergence",
    )
    resume.add_argument("run_dir", type=Path)
    resume.add_argument("--nproc", type=int, default=None, help="processes to resume with (any number)")
    resume.add_argument(
        "--from-checkpoint",
        choices=["last", "best"],
        default=None,
        help="start a NEW run directory from this checkpoint (recording its parent in lineage.json); any "
        "optimization setting may change (optim.*, schedule.*, regularize.*, batch.*, noise.*), data and model may not",
    )
    resume.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="only stop.*, log.* and how processes share the run (distributed.strategy, ...) may differ",
    )

    ev = sub.add_parser(
        "eval",
        help="evaluate a run's checkpoint",
        formatter_class=fmt,
        description="Evaluate a run's best (or last) checkpoint on its test (or val) split and print the metrics.\n\n"
        "example:\n  gradwise eval runs/digits-cnn-20261125-120000 --split test",
    )
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--checkpoint", choices=["best", "last"], default="best")
    ev.add_argument("--split", choices=["test", "val", "train"], default="test")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")

    pred = sub.add_parser(
        "predict",
        help="predict new rows with a run or a compressed variant",
        formatter_class=fmt,
        description="Run a trained run (or a compressed variant under RUN/compressed/) on new rows: a table "
        "(CSV, JSONL, Parquet) encoded as the run encoded its training rows, a text column for a text run, an "
        "NPZ array for an image run. The output keeps the input's row order and id columns and adds "
        "'prediction' (and with --proba one probability column per class). When INPUT holds the target column "
        "the metrics on its rows are printed to stderr.\n\n"
        "examples:\n  gradwise predict runs/tabular-20261204-120000 new_penguins.csv -o predictions.csv\n"
        "  gradwise predict runs/digits-cnn-20261204-120000/compressed/int8 images.npz --proba",
    )
    pred.add_argument("run_dir", type=Path)
    pred.add_argument("input", type=Path, help="the rows to predict: .csv, .jsonl, .parquet or .npz")
    pred.add_argument("-o", "--out", type=Path, help="write here (.csv, .jsonl or .parquet) instead of stdout")
    pred.add_argument("--checkpoint", choices=["best", "last"], default="best")
    pred.add_argument("--proba", action="store_true", help="add one probability column per class")

    rec = sub.add_parser(
        "recipes",
        help="list or copy the bundled recipes",
        formatter_class=fmt,
        description="List the bundled recipes (name, then description), or copy one to edit.\n\n"
        "examples:\n  gradwise recipes\n  gradwise recipes copy digits-mlp my-digits.yaml",
    )
    rec.add_argument("action", nargs="?", choices=["list", "copy"], default="list")
    rec.add_argument("name", nargs="?", help="recipe to copy")
    rec.add_argument("dest", nargs="?", type=Path, help="file or directory to copy it to")

    exp = sub.add_parser(
        "export",
        help="export a run's weights (gradwise or Hugging Face format; LoRA adapters alone or merged)",
        formatter_class=fmt,
        description="Write RUN_DIR/export/ (or -o DIR): model.safetensors, config.yaml and the tokenizer; for a LoRA "
        "run the adapter alone, or with --merge the adapters folded into the base weights.\n\n"
        "--format hf writes RUN_DIR/export-hf/ (or -o DIR) for Hugging Face libraries: hf_causal_lm and gpt runs "
        "load with AutoModelForCausalLM and AutoTokenizer (with the run's chat template), a LoRA run without "
        "--merge as PEFT adapters over its base (PeftModel.from_pretrained), hf_encoder runs with AutoModel plus "
        "head.safetensors and head_config.json. A gpt export can be the model.path of an hf_causal_lm run.\n\n"
        "examples:\n  gradwise export runs/minilm-topics-lora --merge\n  gradwise export runs/digits-cnn -o /tmp/cnn\n"
        "  gradwise export runs/sft --format hf -o /tmp/sft-hf\n  gradwise export runs/gpt-python --format hf",
    )
    exp.add_argument("run_dir", type=Path)
    exp.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base weights")
    exp.add_argument("--checkpoint", choices=["best", "last"], default="best")
    exp.add_argument(
        "--format",
        choices=["gradwise", "hf"],
        default="gradwise",
        help="gradwise: gradwise's own files (default); hf: Hugging Face save_pretrained format",
    )
    exp.add_argument("-o", "--out", type=Path, default=None, help="output directory (default RUN_DIR/export)")

    con = sub.add_parser(
        "consolidate",
        help="assemble an FSDP run's sharded checkpoints into one safetensors file",
        formatter_class=fmt,
        description="A run trained with distributed.strategy=fsdp keeps every rank's shards of the weights in "
        "checkpoints/<tag>/shards/. Write the full weights as checkpoints/<tag>/model.safetensors (or -o FILE, with "
        "one --checkpoint), in one process, for any number of processes the run was saved with. eval, compress and "
        "export also read sharded checkpoints directly; this makes the single file for other tools.\n\n"
        "examples:\n  gradwise consolidate runs/gpt-python\n"
        "  gradwise consolidate runs/gpt-python --checkpoint best -o gpt.safetensors",
    )
    con.add_argument("run_dir", type=Path)
    con.add_argument("--checkpoint", choices=["best", "last", "all"], default="all")
    con.add_argument("-o", "--out", type=Path, default=None, help="output file (with --checkpoint best or last)")

    gen = sub.add_parser(
        "generate",
        help="sample text from a language-model run, or its reply to a chat message",
        formatter_class=fmt,
        description="Sample a continuation of PROMPT from a language-model run's best checkpoint, or with --chat the "
        "reply of an hf_causal_lm run to MESSAGE (rendered with the run's chat template, printed alone); the same "
        "seed gives the same text.\n\nexamples:\n"
        "  gradwise generate runs/gpt-python --prompt 'def main(' --max-new-tokens 120\n"
        "  gradwise generate runs/sft --chat 'What is a list?' --system 'Be brief.' --temperature 0.7 --top-p 0.9",
    )
    gen.add_argument("run_dir", type=Path)
    said = gen.add_mutually_exclusive_group()
    said.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    said.add_argument("--chat", metavar="MESSAGE", default=None, help="a user message to reply to (chat runs)")
    gen.add_argument("--system", default=None, help="a system message before the --chat message")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 = no top-k truncation")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability mass")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", choices=["best", "last"], default="best")

    comp = sub.add_parser(
        "compress",
        help="prune, quantize and distill a run; measure every variant",
        formatter_class=fmt,
        description="Make each variant of a compression recipe from RUN_DIR into RUN_DIR/compressed/<variant>/ "
        "(a run directory: `gradwise eval` works on it), measure the source run and every variant the same way "
        "(parameters, nonzeros, bytes on disk, latency median/p95, throughput, the task metric) and write "
        "RUN_DIR/compressed/comparison.md and pareto.png. A variant that breaks the recipe's accuracy budget is "
        "marked rejected. Finished variants with unchanged steps are reused (--force remakes them).\n\n"
        "examples:\n  gradwise compress runs/digits-cnn compress-digits-cnn\n"
        "  gradwise compress runs/minilm-topics recipes/compress-minilm.yaml --only int8-dynamic budget.max_drop=0.02",
    )
    comp.add_argument("run_dir", type=Path)
    comp.add_argument("recipe", help="compression recipe YAML file or bundled recipe name")
    comp.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    comp.add_argument("--only", default=None, help="comma-separated variants to make (default: all)")
    comp.add_argument("--force", action="store_true", help="remake variants even when already made")

    sw = sub.add_parser(
        "sweep",
        help="hyperparameter search with Optuna over a space file",
        formatter_class=fmt,
        description="Search the config paths listed in SPACE (choices, loguniform(a, b), uniform(a, b), int(a, b)) "
        "around RECIPE with Optuna; every trial is a run directory under the sweep directory, the study lives in a "
        "database (SQLite in the sweep directory unless --storage), and running the same command again continues "
        "it. Weak trials are pruned from their validation metrics. Writes best.yaml (a ready-to-run recipe), "
        "trials.md and trials.png.\n\n"
        "examples:\n  gradwise sweep digits-mlp recipes/spaces/digits-mlp.yaml --trials 30\n"
        "  gradwise sweep my.yaml space.yaml --sampler random --pruner hyperband --storage postgresql://host/db",
    )
    sw.add_argument("recipe", help="recipe YAML file or bundled recipe name")
    sw.add_argument("space", help="space YAML file (config.path: choices or a range) or bundled space name")
    sw.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides on the recipe")
    sw.add_argument("--trials", type=int, default=20, help="finished trials to reach (counting earlier ones)")
    sw.add_argument("--jobs", type=int, default=1, help="trials run at once")
    sw.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    sw.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    sw.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: SQLite in the sweep directory); postgresql://user@host/db lets workers "
        "on several machines share the study (run the same command on each)",
    )
    sw.add_argument(
        "--heartbeat",
        type=int,
        default=None,
        metavar="SECONDS",
        help="with a server --storage: seconds between a worker's heartbeats (default 20); a trial silent for 3 "
        "of them is failed and its values queued again",
    )
    sw.add_argument("--name", default=None, help="sweep directory name (default: sweep-<recipe>)")
    sw.add_argument("--seed", type=int, default=0, help="the sampler's seed")

    cmp = sub.add_parser(
        "compare",
        help="compare strategies over seeds: mean ± std, time to target, curves",
        formatter_class=fmt,
        description="Each TARGET is a run directory (its config is the strategy) or a recipe whose variants are the "
        "strategies. With --seeds K each strategy runs (or is read) with K seeds; the report gives mean ± std of "
        "the final and best metrics, steps and seconds to reach --target, overlaid learning curves, and flags "
        "differences smaller than the seed noise.\n\n"
        "examples:\n  gradwise compare optimizer-tour --seeds 3 --target val_accuracy>=0.95\n"
        "  gradwise compare runs/a runs/b --seeds 5",
    )
    cmp.add_argument("targets", nargs="+", help="run directories or recipes")
    cmp.add_argument("--seeds", type=int, default=1)
    cmp.add_argument("--target", default=None, help="e.g. val_accuracy>=0.95 or val_loss<=0.1")
    cmp.add_argument("-o", "--out", type=Path, default=None, help="output directory")
    cmp.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="key.path=value",
        help="override for every strategy (repeatable), e.g. --set stop.epochs=5",
    )

    lr = sub.add_parser(
        "lr-find",
        help="LR range test: a suggested learning rate and a plot",
        formatter_class=fmt,
        description="Train RECIPE briefly with an exponentially increasing learning rate (Smith 2017) in a "
        "run directory of its own, smooth the loss and suggest the LR of steepest descent; writes lr_find.png and "
        "lr_find.json in that run directory (default: a new OUT_DIR/RECIPE-lr-find-TIME beside the recipe's runs).\n\n"
        "example:\n  gradwise lr-find digits-mlp --min-lr 1e-6 --max-lr 1 --steps 100",
    )
    lr.add_argument("recipe")
    lr.add_argument("overrides", nargs="*", metavar="key.path=value")
    lr.add_argument("--min-lr", type=float, default=1e-7)
    lr.add_argument("--max-lr", type=float, default=10.0)
    lr.add_argument("--steps", type=int, default=100)
    lr.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="the range test's run directory (gets the run, lr_find.png and lr_find.json); must not hold a run",
    )

    bf = sub.add_parser(
        "batch-find",
        help="largest batch that fits in memory, examples/s per batch size",
        formatter_class=fmt,
        description="Double the batch size, then binary-search between the last that fit and the first that ran "
        "out of memory (each probe a few optimizer steps: on CUDA in this process, on CPU in one child process under a "
        "memory cap, replaced after a probe runs out); report examples/s per size and "
        "suggest a batch and accumulation that keep the recipe's global batch.\n\n"
        "example:\n  gradwise batch-find minilm-topics --memory-limit-mb 4000",
    )
    bf.add_argument("recipe")
    bf.add_argument("overrides", nargs="*", metavar="key.path=value")
    bf.add_argument("--start", type=int, default=8)
    bf.add_argument("--max-batch", type=int, default=65536)
    bf.add_argument("--steps", type=int, default=3)
    bf.add_argument("--memory-limit-mb", type=int, default=None)

    rep = sub.add_parser(
        "report",
        help="one self-contained HTML page for runs, sweeps, compares and compressions",
        formatter_class=fmt,
        description="Write one HTML file (images inlined, no network needed to view it) with, per run, its config, "
        "summary, learning curves, LR curve and confusion matrix, and the tables and plots of sweeps, compares, "
        "variant comparisons and compressions.\n\n"
        "example:\n  gradwise report runs/digits-cnn-* runs/digits-cnn-*/compressed -o report.html",
    )
    rep.add_argument("paths", nargs="+", type=Path)
    rep.add_argument("-o", "--out", type=Path, default=Path("report.html"))

    recm = sub.add_parser(
        "recommend",
        help="list a recommender run's top items for a user",
        formatter_class=fmt,
        description="The K items a recommender run (model.name mf, neumf, two_tower) scores highest for USER among "
        "those the user has not rated in the run's training split, with their titles.\n\n"
        "example:\n  gradwise recommend runs/movielens-mf --user 15 -k 10",
    )
    recm.add_argument("run_dir", type=Path)
    recm.add_argument("--user", type=int, required=True, help="the user's id in the data (MovieLens userId)")
    recm.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    recm.add_argument("--checkpoint", choices=["best", "last"], default="best")

    comps = sub.add_parser(
        "components",
        help="list the registered models, data sources or optimizers and their settings",
        formatter_class=fmt,
        description="List every registered component of a kind: its name, what it is and the settings its config "
        "section takes (model.*, data.*, optim.*).\n\nexamples:\n  gradwise components model\n"
        "  gradwise components data",
    )
    comps.add_argument("kind", choices=["model", "data", "optim"])

    sub.add_parser(
        "optimizers",
        help="list the optimizers optim.name accepts",
        formatter_class=fmt,
        description="List every optimizer name with a one-line description.\n\nexample:\n  gradwise optimizers",
    )
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    if issubclass(category, GradwiseWarning):
        return f"gradwise: warning: {message}\n"
    return _default_format(message, category, *args, **kwargs)


_default_format = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (`gradwise sweep R S --trials 4 stop.epochs=3`); argparse
    # leaves them over once an option has ended the positionals.
    if extra and isinstance(getattr(args, "overrides", None), list) and all(_is_override(e) for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.formatwarning = _one_line_warning
    if int(os.environ.get("RANK", "0")) != 0:
        warnings.filterwarnings("ignore", category=GradwiseWarning)  # rank 0 says it once for the whole job
    _quiet_library_loggers()
    try:
        return _COMMANDS[args.command](args)
    except GradwiseError as exc:
        print(f"gradwise {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the machine's failure, not ours: the path and the reason, never a traceback
        from gradwise.store.files import describe_os_error

        print(f"gradwise {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UnicodeDecodeError as exc:
        print(
            f"gradwise {args.command}: error: a file is not UTF-8 text (byte {exc.start}: {exc.reason})",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"gradwise {args.command}: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _quiet_library_loggers() -> None:
    # torchao (imported by peft and transformers when installed) logs a warning for each CUDA-only
    # kernel library it cannot load on a CPU machine, and torch one about torchao's pytree registration:
    # noise on every run, nothing a user can act on. Real errors still show.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- commands


def _train(args: argparse.Namespace) -> int:
    from gradwise.config import apply_overrides, read_yaml, validate
    from gradwise.errors import ConfigError
    from gradwise.experiments.recipes import COMPRESS_PREFIX, find_recipe
    from gradwise.store.rundir import check_resumable, new_run_dir

    if args.nproc is not None:
        return _launch(args.nproc, ["train", args.recipe, *args.overrides])
    recipe = find_recipe(args.recipe)
    raw = apply_overrides(read_yaml(recipe), args.overrides)
    if "budget" in raw or recipe.stem.startswith(COMPRESS_PREFIX):
        raise ConfigError(
            f"{recipe}: a compression recipe; run it on a trained run: gradwise compress RUN_DIR {args.recipe}"
        )
    cfg = validate(raw, source=str(recipe))
    from gradwise.train.tracking import require_extras

    require_extras(cfg)  # before any directory is made
    # The loop (torch, the models) loads only once the config is known to be good: a mistake is instant.
    from gradwise.experiments.variants import run_variants
    from gradwise.report.hooks import plotting_hooks
    from gradwise.train.loop import fit

    if cfg.variants:
        parent = run_variants(raw, cfg, str(recipe), recipe.stem)
        print(f"compared {len(cfg.variants)} variants: {parent}/comparison.md")
        print((parent / "comparison.md").read_text(), end="")
        return 0
    from gradwise.train import distributed

    ctx = distributed.current(cfg.distributed.timeout_s)
    if cfg.resume is not None:
        run_dir = cfg.resume
        check_resumable(run_dir, cfg)
        summary = fit(cfg, run_dir, resume=True, hooks=plotting_hooks(cfg.log.plots))
    else:
        # Every rank trains into the directory rank 0 named (timestamps differ between processes).
        run_dir = ctx.broadcast(new_run_dir(cfg, recipe.stem) if ctx.is_main else None)
        summary = fit(cfg, run_dir, hooks=plotting_hooks(cfg.log.plots))
    _leave(ctx)
    return _report_run(run_dir, summary) if ctx.is_main else 0


def _leave(ctx: Any) -> None:
    """All ranks finish together and leave the process group (ranks exiting without it sometimes abort)."""
    from gradwise.train import distributed

    if ctx.active:
        ctx.barrier()
        distributed.shutdown()


def _launch(nproc: int, command: list[str]) -> int:
    """Run ``gradwise COMMAND`` as ``nproc`` data-parallel processes on this machine (torch's elastic launcher)."""
    from gradwise.train.launch import launch

    return launch(nproc, command)


def _resume(args: argparse.Namespace) -> int:
    from gradwise.config import apply_overrides, read_saved_config, validate
    from gradwise.errors import CheckpointError
    from gradwise.report.hooks import plotting_hooks
    from gradwise.store.rundir import CONFIG_FILE, check_resumable
    from gradwise.train.loop import fit

    saved = args.run_dir / CONFIG_FILE
    if not saved.exists():
        raise CheckpointError(f"{args.run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    cfg = validate(apply_overrides(read_saved_config(saved), args.overrides), source=str(saved))
    if args.from_checkpoint is not None:
        from gradwise.store.branch import branch_run
        from gradwise.train.tracking import require_extras

        require_extras(cfg)  # before the branch's directory is made

        parent = args.run_dir
        args.run_dir = branch_run(parent, args.from_checkpoint, cfg, f"{parent.name}-branch")
        print(f"branched {parent} at checkpoint '{args.from_checkpoint}' into {args.run_dir}")
        cfg = validate(read_saved_config(args.run_dir / CONFIG_FILE), source=str(args.run_dir / CONFIG_FILE))
        args.overrides = []
    check_resumable(args.run_dir, cfg)
    if args.nproc is not None:
        from gradwise.store import lock

        # This process holds the run's lock for the ranks it launches (a second resume is refused here),
        # and names it to them only for the length of the job.
        with lock.holding(args.run_dir), lock.handed_to_children(args.run_dir):
            return _launch(args.nproc, ["resume", str(args.run_dir), *args.overrides])
    from gradwise.train import distributed

    ctx = distributed.current(cfg.distributed.timeout_s)
    summary = fit(cfg, args.run_dir, resume=True, hooks=plotting_hooks(cfg.log.plots))
    _leave(ctx)
    return _report_run(args.run_dir, summary) if ctx.is_main else 0


def _report_run(run_dir: Path, summary: dict[str, Any]) -> int:
    print(f"run: {run_dir}  ({summary['status']}: {summary['stop_reason']})")
    if summary["status"] == "interrupted":
        print(f"resume with: gradwise resume {run_dir}")
        return EXIT_INTERRUPTED
    return 0


def _eval(args: argparse.Namespace) -> int:
    from gradwise.experiments.evaluation import evaluate_run

    result = evaluate_run(args.run_dir, checkpoint=args.checkpoint, split=args.split)
    if args.json:
        print(json.dumps(result.metrics))
        return 0
    print(f"{args.run_dir}  checkpoint={args.checkpoint}  split={args.split}")
    for key, value in result.metrics.items():
        print(f"  {key:<24} {value:.6g}")
    if result.confusion is not None:
        print("  confusion matrix (rows = true class):")
        for row in result.confusion:
            print("   " + " ".join(f"{v:4d}" for v in row))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from gradwise.errors import ConfigError
    from gradwise.experiments.predict import OUTPUT_FORMATS, csv_text, predict_file, write_predictions

    if args.out is not None and args.out.suffix.lower() not in OUTPUT_FORMATS:  # before the model is loaded
        known = ", ".join(OUTPUT_FORMATS)
        raise ConfigError(f"{args.out}: cannot tell the output format from the suffix; use one of {known}")
    predictions = predict_file(args.run_dir, args.input, args.checkpoint, proba=args.proba)
    for column, count in predictions.unknown.items():
        print(f"{args.input}: column {column!r}: {count} row(s) with a category never seen in training "
              "(read as unknown)", file=sys.stderr)  # fmt: skip
    if args.out is None:
        sys.stdout.write(csv_text(predictions))
    else:
        print(f"{predictions.rows} predictions: {write_predictions(predictions, args.out)}", file=sys.stderr)
    if predictions.metrics is not None:
        shown = "  ".join(f"{k} {v:.6g}" for k, v in predictions.metrics.items())
        print(f"{args.input}: scored against its {predictions.rows} targets: {shown}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from gradwise.experiments.export_hf import export_hf

        written = export_hf(args.run_dir, args.out, merge=args.merge, checkpoint=args.checkpoint)
        print(written.out)
        if written.adapter_base is not None:
            print(
                f"adapters only (LoRA, not merged) over the base model {written.adapter_base}: load that model, "
                f"then peft.PeftModel.from_pretrained(model, '{written.out}'); --merge writes a full model instead"
            )
        return 0
    from gradwise.experiments.export import export_run

    print(export_run(args.run_dir, args.out, merge=args.merge, checkpoint=args.checkpoint))
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from gradwise.errors import ConfigError
    from gradwise.store.checkpoint import resolve_checkpoint
    from gradwise.store.sharded import consolidate

    if args.out is not None and args.checkpoint == "all":
        raise ConfigError("consolidate: -o names one file; choose --checkpoint best or --checkpoint last")
    if args.out is None:  # written into the run's own checkpoints: its one writer, and nothing through links
        from gradwise.store import lock
        from gradwise.store.paths import audit_for_writing

        lock.acquire(args.run_dir)
        audit_for_writing(args.run_dir)
    tags = ["last", "best"] if args.checkpoint == "all" else [args.checkpoint]
    present = [tag for tag in tags if args.checkpoint != "all" or (args.run_dir / "checkpoints" / tag).exists()]
    for tag in present or tags:  # nothing present: resolve_checkpoint names what is missing
        written = consolidate(resolve_checkpoint(args.run_dir, tag), args.out)
        print(f"{tag}: {written}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from gradwise.compress.runs import load_run_model, read_data_info
    from gradwise.errors import ConfigError
    from gradwise.generate import Sampling, generate, generate_chat, generate_hf
    from gradwise.store.records import TOKENIZER_DIR

    if args.max_new_tokens < 1 or args.temperature < 0:
        raise ConfigError("generate: --max-new-tokens must be ≥ 1 and --temperature ≥ 0")
    if args.top_k < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        raise ConfigError("generate: --top-k must be ≥ 0 (0: off) and --top-p in (0, 1]")
    if args.system is not None and args.chat is None:
        raise ConfigError("generate: --system goes with --chat MESSAGE")
    cfg, _, model, task, device = load_run_model(args.run_dir, args.checkpoint, with_data=False)
    # A preference-tuned causal LM is a language model too: it generates like the SFT model it started from.
    if task.kind != "language_modeling" and not (task.kind == "preference" and cfg.model.name == "hf_causal_lm"):
        raise ConfigError(f"generate: {args.run_dir} is a {task.kind} run, not a language model")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.seed)
    tokenizer_dir = args.run_dir / TOKENIZER_DIR
    if args.chat is not None:
        info = read_data_info(args.run_dir)
        template = None if info is None else info.chat_template
        if template is None:
            raise ConfigError(
                f"generate --chat: {args.run_dir} was not trained on conversations (its data_info.json records "
                "no chat template); use --prompt"
            )
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        messages = [*system, {"role": "user", "content": args.chat}]
        print(generate_chat(model, tokenizer_dir, messages, template, sampling, device))
    elif cfg.model.name == "hf_causal_lm":
        print(generate_hf(model, tokenizer_dir, args.prompt, sampling, device))
    else:
        text = generate(
            model,
            tokenizer_dir,
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            seed=args.seed,
            device=device,
            top_p=args.top_p,
        )
        print(text)
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from gradwise.errors import ConfigError
    from gradwise.experiments.recipes import copy_recipe, list_recipes

    if args.action == "copy":
        if not args.name or not args.dest:
            raise ConfigError("recipes copy: usage: gradwise recipes copy NAME DEST")
        print(copy_recipe(args.name, args.dest))
        return 0
    recipes = list_recipes()
    width = max(len(r.name) for r in recipes)
    for recipe in recipes:
        print(f"{recipe.name:<{width}}  {recipe.command:<8}  {recipe.description}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from gradwise.compress.compare import measure_all, write_comparison
    from gradwise.compress.pipeline import compress_run, source_budget
    from gradwise.compress.recipe import load_compress_recipe
    from gradwise.experiments.recipes import find_recipe
    from gradwise.store import lock
    from gradwise.store.paths import audit_for_writing

    recipe = load_compress_recipe(find_recipe(args.recipe), args.overrides)
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    budget = source_budget(args.run_dir, recipe)
    audit_for_writing(args.run_dir)  # variants are written inside the source run: no link may lead out of it
    with lock.holding(args.run_dir / "compressed"):  # one compress of a run at a time
        results = compress_run(args.run_dir, recipe, only=only, force=args.force)
        rows = measure_all(args.run_dir, results, recipe.measure, budget)
        table = write_comparison(args.run_dir, rows, budget)
    print(table.read_text(), end="")
    print(f"variants: {table.parent}/<variant>/   plot: {table.parent / 'pareto.png'}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import optuna

    from gradwise.experiments.recipes import find_recipe
    from gradwise.experiments.space import find_space
    from gradwise.experiments.sweep import run_sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # it announces each study at INFO; we print ours
    sweep_dir = run_sweep(
        find_recipe(args.recipe),
        find_space(args.space),
        overrides=args.overrides,
        trials=args.trials,
        jobs=args.jobs,
        sampler=args.sampler,
        pruner=args.pruner,
        storage=args.storage,
        name=args.name,
        seed=args.seed,
        **({} if args.heartbeat is None else {"heartbeat": args.heartbeat}),
    )
    print((sweep_dir / "trials.md").read_text(), end="")
    print(f"sweep: {sweep_dir}   best recipe: {sweep_dir / 'best.yaml'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from gradwise.experiments.compare import compare_runs

    out = compare_runs(args.targets, seeds=args.seeds, target=args.target, out=args.out, overrides=args.overrides)
    print((out / "compare.md").read_text(), end="")
    print(f"compare: {out}")
    return 0


def _lr_find(args: argparse.Namespace) -> int:
    from gradwise.experiments.lr_find import lr_find
    from gradwise.experiments.recipes import find_recipe

    result = lr_find(
        find_recipe(args.recipe), args.overrides, min_lr=args.min_lr, max_lr=args.max_lr, steps=args.steps, out=args.out
    )
    print(result)
    return 0


def _batch_find(args: argparse.Namespace) -> int:
    from gradwise.experiments.batch_find import batch_find
    from gradwise.experiments.recipes import find_recipe

    result = batch_find(
        find_recipe(args.recipe),
        args.overrides,
        start=args.start,
        max_batch=args.max_batch,
        steps=args.steps,
        memory_limit_mb=args.memory_limit_mb,
    )
    print(result)
    return 0


def _report(args: argparse.Namespace) -> int:
    from gradwise.report.html import write_report

    print(write_report(args.paths, args.out))
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from gradwise.experiments.recommend import recommend

    for item in recommend(args.run_dir, args.user, args.k, args.checkpoint):
        print(f"{item.rank:>3}  {item.score:8.4f}  {item.item_id:>7}  {item.title}")
    return 0


def _components(args: argparse.Namespace) -> int:
    from gradwise.config import DATA, MODELS, OPTIMIZERS

    registry = {"model": MODELS, "data": DATA, "optim": OPTIMIZERS}[args.kind]
    components = list(registry)
    width = max(len(c.name) for c in components)
    for component in components:
        print(f"{component.name:<{width}}  {component.description}")
        settings = [key for key in component.section.model_fields if key != "name"]
        print(f"{'':<{width}}  {args.kind}.{{{', '.join(settings)}}}")
    return 0


def _optimizers(args: argparse.Namespace) -> int:
    from gradwise.optim import list_optimizers

    specs = list_optimizers()
    width = max(len(s.name) for s in specs)
    for spec in specs:
        print(f"{spec.name:<{width}}  {spec.description}")
    return 0


_COMMANDS = {
    "train": _train,
    "resume": _resume,
    "eval": _eval,
    "predict": _predict,
    "export": _export,
    "consolidate": _consolidate,
    "generate": _generate,
    "recipes": _recipes,
    "compress": _compress,
    "sweep": _sweep,
    "compare": _compare,
    "lr-find": _lr_find,
    "batch-find": _batch_find,
    "report": _report,
    "optimizers": _optimizers,
    "recommend": _recommend,
    "components": _components,
}
