"""Console entry points. The core package runs the model; the commands that train, evaluate or compare need the
`train` or `bench` extra, and say so in one line when it is missing."""

import argparse
import contextlib
import importlib.util
import shlex
import sys
from pathlib import Path

# What each extra installs that its commands import (module names, not package names).
TRAIN_MODULES = ("accelerate", "datasets", "yaml", "matplotlib")
EXTRA_MODULES = {"train": TRAIN_MODULES, "bench": (*TRAIN_MODULES, "PIL"), "explore": ("gradio", "matplotlib")}


def require_extra(prog: str, extra: str) -> None:
    """End the command `prog` in one line (exit 2) when the extra it needs is not installed."""
    missing = [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{prog}: error: this command needs {', '.join(missing)}, which the core package does not install: "
              f"pip install 'modeling_essm[{extra}]'", file=sys.stderr)
        raise SystemExit(2)


def compare_main(argv=None):
    require_extra("essm-compare", "bench")
    from .compare import main

    main(argv)


def train_sharded_main(argv=None):
    require_extra("essm-train-sharded", "train")
    from .sharded_training import main

    main(argv)


@contextlib.contextmanager
def user_errors_in_one_line(parser):
    """A bad run config, argument, ESSM_REUSE_FREED_MEMORY value or missing file ends the command with one line and
    exit status 2."""
    from .cpu_allocator import AllocatorRequestError
    from .training import RunConfigError

    try:
        yield
    except (RunConfigError, AllocatorRequestError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def add_override_argument(parser):
    """`--set SECTION.KEY=VALUE`, repeatable: the run-config overrides of every training command."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, parsed as YAML (repeatable), e.g. --set training.max_steps=50",
    )


def add_data_arguments(parser):
    parser.add_argument("--data", help="your evaluation data: a datasets folder (save_to_disk) or a .json, .jsonl, "
                        ".csv or .parquet file with a text column (and a label column for a classifier) or "
                        "input_ids; default: the eval split of the task in the folder's run_config.yaml")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")


def train_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="essm-train",
        description="Train an ES-SSM with budget dropout from a YAML run config "
        "(works under torchrun and accelerate launch too).",
    )
    parser.add_argument("config", help="YAML run config with task, model, budget and training sections")
    add_override_argument(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="resume from CHECKPOINT, or from the last checkpoint in output_dir when no path is given",
    )
    args = parser.parse_args(argv)
    require_extra(parser.prog, "train")
    from .cpu_allocator import reuse_freed_memory_in_command, reuse_freed_memory_requested
    from .training import close_process_group, load_run_config, train

    with user_errors_in_one_line(parser):
        reuse_requested = reuse_freed_memory_requested()
        run_config = load_run_config(args.config, args.overrides)
    reuse_freed_memory_in_command(reuse_requested)
    train(run_config, resume_from_checkpoint=args.resume)
    close_process_group()


def eval_budgets_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="essm-eval-budgets",
        description="Evaluate a trained ES-SSM at every spectral budget; writes budget_sweep.{json,md,png}.",
    )
    parser.add_argument("model_dir", help="output_dir of an essm-train run (holds the model and run_config.yaml), "
                        "or with --data any saved model folder or Hub id")
    parser.add_argument("--budgets", type=int, nargs="+", help="budgets to evaluate (default: the budget grid)")
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-eval-samples", type=int, help="evaluate on the first N eval examples only")
    parser.add_argument("--output-dir", help="where to write the report (default: model_dir)")
    args = parser.parse_args(argv)
    require_extra(parser.prog, "train")
    from .cpu_allocator import reuse_freed_memory_in_command, reuse_freed_memory_requested
    from .evaluation import check_sweep_request, eval_budgets

    with user_errors_in_one_line(parser):
        reuse_requested = reuse_freed_memory_requested()  # before a Hub model's config is fetched
        check_sweep_request(args.model_dir, args.budgets, args.data)  # before the data and the model load
    reuses_freed_memory = reuse_freed_memory_in_command(reuse_requested)
    command = shlex.join(["essm-eval-budgets", *(sys.argv[1:] if argv is None else argv)])
    eval_budgets(
        args.model_dir,
        budgets=args.budgets,
        batch_size=args.batch_size,
        max_eval_samples=args.max_eval_samples,
        output_dir=args.output_dir,
        command=command,
        data=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        reuses_freed_memory=reuses_freed_memory,
    )


def plan_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="essm-plan",
        description="Measure a trained ES-SSM at uniform and per-layer budgets (quality, parameters, FLOPs, latency, "
        "peak memory), write the frontier to budget_plan.{json,png}, and given a target pick the best plan and "
        "write it as the model's default budget or as a sliced model.",
    )
    require_extra(parser.prog, "train")  # before the options, which come from the planner
    from .planner import TARGETS, check_plan_request, plan_budgets

    parser.add_argument("model_dir", help="a saved model folder (the output_dir of an essm-train run, or any)")
    add_data_arguments(parser)
    parser.add_argument("--max-eval-samples", type=int, help="evaluate on the first N examples only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per latency (the median is reported)")
    for name, field in TARGETS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float,
                            help=f"target: {field.replace('_', ' ')} at most this"
                            + (" (relative to the full budget, e.g. 0.05)" if field == "quality_drop" else ""))
    parser.add_argument("--write-default", metavar="DIR", help="save the model with the chosen plan as its default "
                        "budget into DIR (new or empty)")
    parser.add_argument("--write-slice", metavar="DIR", help="save the model sliced to the chosen plan into DIR "
                        "(new or empty)")
    parser.add_argument("--output-dir", help="where to write budget_plan.{json,png} (default: model_dir)")
    args = parser.parse_args(argv)
    targets = {name: getattr(args, name) for name in TARGETS}
    request = dict(data=args.data, targets=targets, write_default=args.write_default, write_slice=args.write_slice)
    sizes = dict(max_eval_samples=args.max_eval_samples, batch_size=args.batch_size, repeats=args.repeats)
    command = shlex.join(["essm-plan", *(sys.argv[1:] if argv is None else argv)])
    with user_errors_in_one_line(parser):
        check_plan_request(args.model_dir, **request, **sizes)  # before the data and the model load
        # A target no measured plan meets ends here too, in one line, after the frontier is written.
        plan_budgets(args.model_dir, **request, **sizes, output_dir=args.output_dir, text_column=args.text_column,
                     label_column=args.label_column, command=command)


def explore_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="essm-explore",
        description="Serve the budget explorer of a saved ES-SSM in the browser: generation (a causal LM) or "
        "predictions (a classifier) at any spectral budget, with the measured cost and the budget-quality curve.",
    )
    parser.add_argument("model", help="a saved model folder (e.g. the output_dir of essm-train) or a Hub id")
    parser.add_argument("--data", help="evaluation data for measuring the quality curve on demand, as essm-eval-budgets "
                        "takes it (default: the task in the folder's run_config.yaml)")
    parser.add_argument("--curve-samples", type=int, default=200,
                        help="evaluation examples per budget when the curve is measured on demand (default: 200)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0 serves the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--write-space", metavar="DIR", help="do not serve: write a Hugging Face Space that serves "
                        "the explorer of MODEL (a pushed model's Hub id) into DIR (new or empty)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in [1, 65535], got {args.port}")
    if args.curve_samples < 1:
        parser.error(f"--curve-samples must be a positive integer, got {args.curve_samples}")
    if args.data is not None and not Path(args.data).exists():
        parser.error(f"--data {args.data} does not exist")
    require_extra(parser.prog, "explore")
    if args.write_space:
        from .hub import write_space

        try:
            folder = write_space(args.model, args.write_space)
        except ValueError as error:
            parser.error(str(error))
        print(f"wrote a Space for {args.model} into {folder}; push it with: "
              f"hf upload --repo-type space OWNER/NAME {folder}")
        return
    from .explorer import ExplorerError, build_app, load_explored

    try:
        explored = load_explored(args.model, args.data)
    except ExplorerError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    build_app(explored, args.model, args.curve_samples).launch(server_name=args.host, server_port=args.port,
                                                               share=args.share)
