"""One task, four models, the same data, steps and optimiser: `essm-compare CONFIG --models ...`.

The models of a comparison, all trained from the same YAML run config (see `training.py`):

    essm        ES-SSM with budget dropout (the config's budget section, the paper schedule)
    essm-fixed  the same ES-SSM trained only at the full budget K (the non-elastic ablation, no sandwich rule)
    llama       Llama (SDPA) with the ES-SSM's parameter count
    mamba       Mamba with the ES-SSM's parameter count
                (classifiers pool the sequence by masked mean as the ES-SSM does; see `baselines.py`)

Each model trains in `<training.output_dir>/<model>`. The ES-SSM variants are then evaluated at
every budget of the grid by `evaluation.eval_budgets`, the baselines once with the same metric
code; one JSON per model goes to `<results_dir>/<task>/<model>.json` as soon as it is done.
"""

import argparse
import copy
import importlib.metadata
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch
import transformers

from .baselines import BASELINES, count_parameters, matched_baseline
from .cli import add_override_argument, user_errors_in_one_line
from .configuration_essm import ESSSMConfig
from .cpu_allocator import reuse_freed_memory_in_command, reuse_freed_memory_requested
from .evaluation import eval_budgets, measure
from .training import load_run_config, train


ESSM_MODELS = ("essm", "essm-fixed")
MODELS = ESSM_MODELS + BASELINES
DEFAULT_RESULTS_DIR = "results"


def check_models(names):
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        problem = f"unknown models {unknown}" if unknown else "no models given"
        raise ValueError(f"{problem}; valid models: {', '.join(MODELS)}")
    return names


def parse_models(text):
    """'essm,llama' -> ['essm', 'llama']; an unknown name is an error that lists the valid ones."""
    return check_models(list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip())))


def model_run_config(run_config, model):
    """The run config of one model: its own output_dir; `essm-fixed` trains at the full budget K only."""
    config = copy.deepcopy(run_config)
    config["training"]["output_dir"] = str(Path(run_config["training"]["output_dir"]) / model)
    if model == "essm-fixed":
        num_filters = ESSSMConfig(**config["model"]).num_spectral_filters
        config["budget"] = {"schedule": "fixed", "fixed_budget": num_filters}
        config["recipe"] = {**config["recipe"], "sandwich": False}  # one budget only
    return config


def evaluate_model(model, dataset, collator, batch_size, causal_lm):
    """Metric, loss and tokens/s of a model without budgets, by the loop of the budget sweep."""
    model.eval()
    return measure(model, dataset, collator, {"model": {}}, batch_size, causal_lm)["model"]


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def train_summary(log_history):
    """Training time, steps and final loss from the Trainer's closing log entry."""
    summary = next(entry for entry in reversed(log_history) if "train_runtime" in entry)
    return {
        "train_seconds": summary["train_runtime"],
        "train_steps": summary["step"],
        "seconds_per_step": summary["train_runtime"] / summary["step"],
        "train_loss": summary["train_loss"],
    }


def run_model(run_config, model_name, results_dir, command=None, reuses_freed_memory=False):
    """Train one model of the comparison, evaluate it and write `<results_dir>/<task>/<model>.json`."""
    config = model_run_config(run_config, model_name)
    build_model = None if model_name in ESSM_MODELS else partial(matched_baseline, model_name)
    trainer, _ = train(config, build_model=build_model)
    causal_lm = trainer.model.can_generate()  # as ESSSMTrainer decides it: the language models generate
    batch_size = trainer.args.per_device_eval_batch_size
    if model_name in ESSM_MODELS:
        budgets, _ = eval_budgets(trainer.args.output_dir, batch_size=batch_size, command=command,
                                  reuses_freed_memory=reuses_freed_memory)
        full_budget = budgets[-1]
    else:
        budgets = None
        full_budget = evaluate_model(trainer.model, trainer.eval_dataset, trainer.data_collator, batch_size, causal_lm)
    metric = "bits_per_byte" if causal_lm else "accuracy"
    result = {
        "task": config["task"]["name"],
        "model": model_name,
        "metric": metric,
        metric: full_budget[metric],
        "loss": full_budget["loss"],
        "tokens_per_second": full_budget["tokens_per_second"],
        "parameters": count_parameters(trainer.model),
        "budgets": budgets,
        **train_summary(trainer.state.log_history),
        "model_class": type(trainer.model).__name__,
        "model_config": trainer.model.config.to_dict(),
        "settings": {
            "run_config": config,
            "eval_samples": len(trainer.eval_dataset),
            "eval_batch_size": batch_size,
            "num_threads": torch.get_num_threads(),
            "reuses_freed_memory": reuses_freed_memory,  # see cpu_allocator: changes speeds, not results
            # mambapy decides which scan Mamba runs on CPU (see baselines.mamba_config).
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "mambapy": package_version("mambapy")},
            "command": command,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    path = Path(results_dir) / result["task"] / f"{model_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{model_name}: {metric} {result[metric]:.4f}, {result['parameters']:,} parameters -> {path}")
    return result


def compare(config_path, models=MODELS, overrides=(), results_dir=DEFAULT_RESULTS_DIR, command=None,
            reuses_freed_memory=False):
    """Train and evaluate each of `models` on the run config at `config_path`; one JSON each.

    `reuses_freed_memory` is recorded with the results (the command switches the allocator setting on when
    asked to: modeling_essm.cpu_allocator).
    """
    check_models(models)
    run_config = load_run_config(config_path, overrides)
    return [run_model(run_config, name, results_dir, command, reuses_freed_memory) for name in models]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="essm-compare",
        description="Train ES-SSM (budget dropout), ES-SSM trained at full K only, Llama and Mamba on one task "
        "with the same data, steps and optimiser; write one JSON per model to RESULTS_DIR/<task>/<model>.json.",
    )
    parser.add_argument("config", help="YAML run config (e.g. configs/bench/listops.yaml)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    add_override_argument(parser)
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR, help="where the JSON results go")
    args = parser.parse_args(argv)
    try:
        models = parse_models(args.models)
    except ValueError as error:
        parser.error(str(error))
    command = shlex.join(["essm-compare", *(sys.argv[1:] if argv is None else argv)])
    with user_errors_in_one_line(parser):
        reuse_requested = reuse_freed_memory_requested()
        load_run_config(args.config, args.overrides)  # every check, before the allocator or any data
    compare(args.config, models, args.overrides, args.results_dir, command,
            reuse_freed_memory_in_command(reuse_requested))
