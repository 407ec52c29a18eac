"""Budget sweep: evaluate one trained ES-SSM at every spectral budget of the grid.

The saved model is reloaded through the Auto classes (as a user would) and called with
`spectral_budget=k`; for each k the sweep reports the task metric, the loss, the parameter
count of the model sliced to k, and the throughput. Results go to JSON, a markdown table
and a PNG plot.
"""

import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from .budget import default_budget_grid
from .configuration_essm import ESSSMConfig
from .modeling_essm import resolve_spectral_budget
from .tasks import load_task
from .training import IGNORE_INDEX, RUN_CONFIG_NAME, RunConfigError, collator_for, is_language_model, load_run_config


REPORT_NAME = "budget_sweep"


def auto_class_for(task):
    return AutoModelForCausalLM if is_language_model(task) else AutoModelForSequenceClassification


class BudgetStats:
    """Running loss, accuracy and per-batch throughput of one budget."""

    def __init__(self, causal_lm):
        self.causal_lm = causal_lm
        self.loss = 0.0
        self.predictions = 0
        self.correct = 0
        self.tokens_per_second = []

    def update(self, logits, labels, tokens, seconds):
        if self.causal_lm:  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
        counted = labels != IGNORE_INDEX
        self.loss += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        self.predictions += int(counted.sum())
        self.correct += int((logits.argmax(-1) == labels)[counted].sum())
        self.tokens_per_second.append(tokens / seconds)

    def summary(self):
        loss = self.loss / self.predictions
        metric = {"bits_per_byte": loss / math.log(2)} if self.causal_lm else {"accuracy": self.correct / self.predictions}
        # The median over batches shrugs off the stalls of a shared machine.
        return {**metric, "loss": loss, "tokens_per_second": statistics.median(self.tokens_per_second)}


@torch.inference_mode()
def measure(model, dataset, collator, calls: dict, batch_size=32, causal_lm=False) -> dict:
    """Metric, loss and tokens/s of each call of `model`, {name: forward keyword arguments}, over `dataset`.

    The one evaluation loop of the package: the budget sweep and the comparisons' baselines both use it. Calls take
    turns on every batch, so a slow spell of a shared machine hits them all alike.
    """
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    batches = [{name: tensor.to(device) for name, tensor in batch.items()} for batch in loader]
    stats = {name: BudgetStats(causal_lm) for name in calls}
    for options in calls.values():  # warm-up: first-call allocations stay out of the timings
        model(**without_labels(batches[0]), **options)
    for batch in tqdm(batches, desc=f"evaluation ({len(calls)} call{'s' * (len(calls) > 1)})"):
        inputs, tokens = without_labels(batch), int(batch["attention_mask"].sum())
        for name, options in calls.items():
            start = time.perf_counter()
            logits = model(**inputs, **options).logits
            synchronize(device)
            stats[name].update(logits, batch["labels"], tokens, time.perf_counter() - start)
    return {name: stats[name].summary() for name in calls}


def sweep_budgets(model, dataset, collator, budgets, batch_size=32, causal_lm=False):
    """One row per budget: its metric, loss, tokens/s and the parameters a model sliced to it keeps."""
    summaries = measure(model, dataset, collator, {budget: {"spectral_budget": budget} for budget in budgets},
                        batch_size, causal_lm)
    return [{"budget": budget, **summaries[budget], "parameters": model.slice_to_budget(budget).num_parameters()}
            for budget in budgets]


def synchronize(device):
    # CUDA kernels run asynchronously: wait for them before reading the clock.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def without_labels(batch):
    return {name: tensor for name, tensor in batch.items() if name != "labels"}


def metric_name(rows):
    return "accuracy" if "accuracy" in rows[0] else "bits_per_byte"


def markdown_table(rows):
    metric = metric_name(rows)
    lines = [
        f"| budget k | {metric} | loss | parameters | tokens/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['budget']} | {row[metric]:.4f} | {row['loss']:.4f} | {row['parameters']:,} | "
            f"{row['tokens_per_second']:,.0f} |"
        )
    return "\n".join(lines)


def plot_sweep(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    metric = metric_name(rows)
    budgets = [row["budget"] for row in rows]
    figure, (quality, cost) = plt.subplots(1, 2, figsize=(10, 4))
    quality.plot(budgets, [row[metric] for row in rows], marker="o")
    quality.set(xlabel="spectral budget k", ylabel=metric.replace("_", " "), title=title)
    quality.set_ylim(bottom=0)  # from zero, so that small wiggles look small
    cost.plot(budgets, [row["parameters"] / 1e6 for row in rows], marker="o", color="tab:blue")
    cost.set(xlabel="spectral budget k", title="cost")
    cost.set_ylabel("parameters (M)", color="tab:blue")
    throughput = cost.twinx()
    throughput.plot(budgets, [row["tokens_per_second"] for row in rows], marker="s", color="tab:orange")
    throughput.set_ylabel("tokens/s", color="tab:orange")
    for axis in (quality, cost):
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(k) for k in budgets])
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(rows, output_dir, settings):
    """budget_sweep.json (rows and settings), budget_sweep.md (table) and budget_sweep.png (plot)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {suffix: output_dir / f"{REPORT_NAME}.{suffix}" for suffix in ("json", "md", "png")}
    paths["json"].write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    command = settings.get("command")
    header = f"Budget sweep of `{settings['model_dir']}` on {settings['task']} ({settings['eval_samples']} eval samples)"
    reproduce = f"\n\nReproduce: `{command}`" if command else ""
    paths["md"].write_text(f"{header}\n\n{markdown_table(rows)}{reproduce}\n")
    plot_sweep(rows, paths["png"], title=f"{settings['task']}: one model, every budget")
    return paths


def check_sweep_request(model_dir, budgets=None):
    """The checks of `eval_budgets` that need neither the data nor the weights: the folder, and every budget
    against the saved model's config. Raises FileNotFoundError or RunConfigError."""
    model_dir = Path(model_dir)
    if not (model_dir / RUN_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{model_dir} has no {RUN_CONFIG_NAME}: pass the output_dir of a training run")
    config = ESSSMConfig.from_pretrained(model_dir)
    try:
        for budget in budgets or ():
            resolve_spectral_budget(budget, config)
    except ValueError as error:
        raise RunConfigError(f"--budgets: {error}") from error
    return load_run_config(model_dir / RUN_CONFIG_NAME)


def eval_budgets(model_dir, budgets=None, batch_size=32, max_eval_samples=None, output_dir=None, command=None):
    """Sweep the model saved in `model_dir` (a training run's output_dir) over `budgets` (default: the grid)."""
    model_dir = Path(model_dir)
    task_section = dict(check_sweep_request(model_dir, budgets)["task"])
    task = load_task(task_section.pop("name"), **task_section)
    auto_class = auto_class_for(task)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = auto_class.from_pretrained(model_dir).to(device).eval()
    config = model.config
    budgets = sorted(budgets or default_budget_grid(config.num_spectral_filters, config.min_spectral_budget))
    dataset = task.eval if max_eval_samples is None else task.eval.select(range(min(max_eval_samples, len(task.eval))))
    print(
        f"{auto_class.__name__}.from_pretrained({str(model_dir)!r}) -> {type(model).__name__}; "
        f"calling it with spectral_budget=k for k in {budgets}"
    )
    rows = sweep_budgets(model, dataset, collator_for(task), budgets, batch_size, is_language_model(task))
    settings = {
        "model_dir": str(model_dir),
        "task": task.name,
        "eval_samples": len(dataset),
        "batch_size": batch_size,
        "num_threads": torch.get_num_threads(),
        "device": str(model.device),
        "command": command,
    }
    paths = write_report(rows, output_dir or model_dir, settings)
    print(markdown_table(rows))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return rows, paths
