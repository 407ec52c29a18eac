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
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .budget import default_budget_grid
from .configuration_essm import ESSSMConfig
from .modeling_essm import resolve_spectral_budget
from .tasks import load_task
from .tasks.files import FILE_KINDS, classification_split, label_names, language_modeling_split, read_table
from .training import (IGNORE_INDEX, RUN_CONFIG_NAME, PaddingCollator, RunConfigError, collator_for,
                       is_language_model, load_run_config)


REPORT_NAME = "budget_sweep"


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
    return [{"budget": budget, **summaries[budget], "parameters": model.num_parameters_at_budget(budget)}
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


def is_causal_lm(config) -> bool:
    return any(name.endswith("ForCausalLM") for name in config.architectures or ())


def check_data_request(model_dir, data=None) -> None:
    """A model folder with a run config naming its task, or any saved model (a folder, or a Hub id in the local
    cache) with `data`, an existing data file or folder. Raises FileNotFoundError or RunConfigError."""
    local = Path(model_dir).is_dir()
    if data is None:
        if not local or not (Path(model_dir) / RUN_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{model_dir} has no {RUN_CONFIG_NAME} naming its task: pass the output_dir of "
                                    "a training run, or your own evaluation data with --data")
    else:
        data = Path(data)
        if not data.exists():
            raise FileNotFoundError(f"--data {data} does not exist")
        if data.is_file() and data.suffix not in FILE_KINDS:
            raise RunConfigError(f"--data {data}: pass a datasets folder (save_to_disk) or a .json, .jsonl, .csv or "
                                 ".parquet file")
    if local and not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no saved model (config.json): pass a model folder")


def load_user_data(path, model_dir, config, text_column="text", label_column="label"):
    """Evaluation rows from your file or `datasets` folder (see `tasks.files`): token ids, or text read by the
    tokenizer saved with the model; a language model's rows cut into chunks it can read, a classifier's labels
    (names through the model's `id2label`)."""
    table = read_table(path)
    encode = None
    if "input_ids" not in table.column_names:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as error:
            raise RunConfigError(f"{path} holds text but {model_dir} has no tokenizer to read it with ({error}); "
                                 "save one with the model or pass token ids in an input_ids column") from error
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    limit = config.max_position_embeddings
    try:
        if is_causal_lm(config):
            return language_modeling_split(table, path, text_column, limit, encode)
        named = label_names(table, label_column) is not None
        names = {name: int(i) for i, name in config.id2label.items()} if named else None  # the model's own ids
        return classification_split(table, path, text_column, label_column, limit, encode, names)
    except ValueError as error:
        raise RunConfigError(str(error)) from error


def evaluation_data(model_dir, data=None, max_eval_samples=None, text_column="text", label_column="label"):
    """(dataset, collator, causal_lm, source): the eval split of the task in the folder's run config, or your own
    data; `source` names it (the task, or the data's path) for reports."""
    config = AutoConfig.from_pretrained(model_dir)
    if data is None:
        task_section = dict(load_run_config(Path(model_dir) / RUN_CONFIG_NAME)["task"])
        task = load_task(task_section.pop("name"), **task_section)
        dataset, collator, causal_lm, source = task.eval, collator_for(task), is_language_model(task), task.name
    else:
        dataset = load_user_data(data, model_dir, config, text_column, label_column)
        causal_lm, source = is_causal_lm(config), str(data)
        collator = PaddingCollator(pad_token_id=config.pad_token_id, causal_lm=causal_lm)
    if max_eval_samples is not None:
        dataset = dataset.select(range(min(max_eval_samples, len(dataset))))
    return dataset, collator, causal_lm, source


def default_output_dir(model_dir) -> Path:
    """Reports go beside a local model, or into the working directory for a Hub id."""
    return Path(model_dir) if Path(model_dir).is_dir() else Path(".")


def check_sweep_request(model_dir, budgets=None, data=None) -> None:
    """The checks of `eval_budgets` that need neither the data nor the weights: the model and data (see
    `check_data_request`), and every budget against the saved model's config. Raises FileNotFoundError or
    RunConfigError."""
    check_data_request(model_dir, data)
    config = ESSSMConfig.from_pretrained(model_dir)
    try:
        for budget in budgets or ():
            resolve_spectral_budget(budget, config)
    except ValueError as error:
        raise RunConfigError(f"--budgets: {error}") from error


def eval_budgets(model_dir, budgets=None, batch_size=32, max_eval_samples=None, output_dir=None, command=None,
                 data=None, text_column="text", label_column="label", reuses_freed_memory=False):
    """Sweep a saved model over `budgets` (default: the grid) on the eval split of its task (a training run's
    output_dir) or on `data` (your file or datasets folder; then `model_dir` may be any saved model or Hub id).

    `reuses_freed_memory` is recorded with the report: whether the calling command had glibc keep freed memory for
    reuse (modeling_essm.cpu_allocator), which changes the tokens/s but not the quality."""
    check_sweep_request(model_dir, budgets, data)
    dataset, collator, causal_lm, source = evaluation_data(model_dir, data, max_eval_samples, text_column,
                                                           label_column)
    auto_class = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = auto_class.from_pretrained(model_dir).to(device).eval()
    config = model.config
    budgets = sorted(budgets or default_budget_grid(config.num_spectral_filters, config.min_spectral_budget))
    print(
        f"{auto_class.__name__}.from_pretrained({str(model_dir)!r}) -> {type(model).__name__}; "
        f"calling it with spectral_budget=k for k in {budgets}"
    )
    rows = sweep_budgets(model, dataset, collator, budgets, batch_size, causal_lm)
    settings = {
        "model_dir": str(model_dir),
        "task": source,
        "eval_samples": len(dataset),
        "batch_size": batch_size,
        "num_threads": torch.get_num_threads(),
        "reuses_freed_memory": reuses_freed_memory,
        "device": str(model.device),
        "command": command,
    }
    paths = write_report(rows, output_dir or default_output_dir(model_dir), settings)
    print(markdown_table(rows))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return rows, paths
