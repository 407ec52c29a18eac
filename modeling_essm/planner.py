"""Budget planner: from a deployment target to the spectral budget a trained ES-SSM should run at.

It measures the quality of candidate budgets on evaluation data: every uniform budget of the grid, and per-layer
budgets found by greedy removal (from the full budget, lower one layer at a time by one grid level, always the
layer whose step costs the least evaluation loss per channel removed). It measures the cost of each on this
machine: parameters kept by a slice, FLOPs per token, latency per token and per sequence, and peak memory. The
Pareto frontier goes to budget_plan.json and budget_plan.png. Given a target (`--max-ms-per-token`,
`--max-params`, `--max-quality-drop`, ...) it picks the best plan that meets it, measures that plan again, and
writes it as the model's default budget or as a compact sliced model.
"""

import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from .budget import default_budget_grid
from .configuration_essm import ESSSMConfig
from .evaluation import (check_data_request, default_output_dir, evaluation_data, is_causal_lm, measure, metric_name,
                         synchronize, without_labels)
from .folders import check_new_folder, written_atomically
from .modeling_essm import fft_length
from .training import RUN_CONFIG_NAME, RunConfigError

REPORT_NAME = "budget_plan"
# Target option -> the measured field it bounds from above.
TARGETS = {
    "max_ms_per_token": "ms_per_token",
    "max_ms_per_sequence": "ms_per_sequence",
    "max_params": "parameters",
    "max_flops_per_token": "flops_per_token",
    "max_peak_memory_mb": "peak_memory_mb",
    "max_quality_drop": "quality_drop",
}
COST_FIELDS = ("parameters", "flops_per_token", "ms_per_token", "ms_per_sequence", "peak_memory_mb")


# --- costs -------------------------------------------------------------------------------------------------------


def flops_per_token(config: ESSSMConfig, layer_budgets, seq_len: int) -> float:
    """Floating-point operations per token of a whole-sequence forward of length `seq_len` (an analytic count).

    Per layer: the gate MLP, the FFT of the input and one inverse FFT per active channel (2.5 n log2 n for a real
    FFT of size n), the spectral products, the projections M_j of the active channels, the skip matrix, the local
    convolution and the feed-forward; then the output head.
    """
    hidden, gate, n_fft = config.hidden_size, config.gate_hidden_size, fft_length(seq_len)
    fft = 2.5 * n_fft * math.log2(n_fft) / seq_len  # one real FFT, per token
    total = 0.0
    for k, full in zip(layer_budgets, config.layer_spectral_filters):
        total += 2 * hidden * gate + 2 * gate * full  # every logit is computed, the first k are used
        total += (1 + k) * hidden * fft + 6 * k * hidden * (n_fft // 2 + 1) / seq_len
        total += 2 * k * hidden * hidden + 2 * hidden * hidden + 2 * hidden * config.local_conv_size
        total += 4 * hidden * config.intermediate_size
    outputs = config.vocab_size if is_causal_lm(config) else config.num_labels
    return total + 2 * hidden * outputs


def median_ms(fn, repeats: int, device) -> float:
    fn()  # warm-up: first-call allocations stay out of the timings
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peak_memory_mb(fn, device) -> float:
    """Peak of the memory that `fn`'s tensors hold at once, above what was allocated before it.

    CUDA: the allocator's peak. CPU: the allocations and frees the profiler records, summed in order; this
    follows torch's tensors only, not the process (no process-wide setting is changed).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def decoding_ms_per_token(model, prompt, layer_budgets, new_tokens: int) -> float:
    """Median time of one cached decoding step after `prompt` (1, T)."""
    with torch.inference_mode():
        cache = model(prompt, spectral_budget=list(layer_budgets), use_cache=True, logits_to_keep=1).cache
        token = prompt[:, -1:]
        times = []
        for _ in range(new_tokens):
            start = time.perf_counter()
            token = model(token, cache=cache, spectral_budget=list(layer_budgets)).logits[:, -1:].argmax(-1)
            synchronize(prompt.device)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_costs(model, layer_budgets, sequence: dict, batch: dict, causal_lm: bool, repeats=20) -> dict:
    """What a plan costs on this machine: `sequence` is one example (batch 1) for the latencies, `batch` a batch
    of examples for the peak memory."""
    device = next(model.parameters()).device
    budget = list(layer_budgets)
    seq_len = next(iter(sequence.values())).shape[1]

    def forward(inputs):
        with torch.inference_mode():
            model(**inputs, spectral_budget=budget)

    per_sequence = median_ms(lambda: forward(sequence), repeats, device)
    if causal_lm:
        # The prompt leaves room for the decoded tokens within the filter length.
        new_tokens = min(32, model.config.max_position_embeddings - 1)
        prompt = sequence["input_ids"][:, : model.config.max_position_embeddings - new_tokens]
        per_token = decoding_ms_per_token(model, prompt, layer_budgets, new_tokens)
    else:
        per_token = per_sequence / seq_len  # a classifier reads whole sequences
    return {
        "parameters": model.num_parameters_at_budget(budget),
        "flops_per_token": flops_per_token(model.config, layer_budgets, seq_len),
        "ms_per_token": per_token,
        "ms_per_sequence": per_sequence,
        "peak_memory_mb": peak_memory_mb(lambda: forward(batch), device),
    }


# --- quality and the search --------------------------------------------------------------------------------------


def quality(row, metric: str) -> float:
    """The metric turned so that higher is better: accuracy as it is, bits per byte negated."""
    return row[metric] if metric == "accuracy" else -row[metric]


def quality_drop(summary, full, metric: str) -> float:
    """The relative loss of quality against the full budget: accuracy lost, or bits per byte gained, over full."""
    return (quality(full, metric) - quality(summary, metric)) / full[metric]


def measure_quality(model, dataset, collator, plans, batch_size, causal_lm) -> dict:
    """{layer budgets: metric and loss} of every plan, in one pass over the data."""
    calls = {plan: {"spectral_budget": list(plan)} for plan in plans}
    return measure(model, dataset, collator, calls, batch_size, causal_lm)


def lower_level(levels, k):
    below = [level for level in levels if level < k]
    return below[-1] if below else None


def greedy_layer_search(model, dataset, collator, levels, batch_size, causal_lm, measured: dict) -> list:
    """Per-layer plans from the full budget down to the smallest level in every layer, in removal order.

    Each step lowers by one level the layer whose step raises the evaluation loss least per channel removed (the
    measured sensitivity). `measured` caches quality by plan and is filled in.
    """
    current = tuple(model.config.layer_spectral_filters)
    path = []
    while True:
        steps = {}
        for layer, k in enumerate(current):
            lower = lower_level(levels, k)
            if lower is not None:
                steps[current[:layer] + (lower,) + current[layer + 1 :]] = k - lower
        if not steps:
            return path
        unmeasured = [plan for plan in steps if plan not in measured]
        if unmeasured:
            measured.update(measure_quality(model, dataset, collator, unmeasured, batch_size, causal_lm))
        current = min(steps, key=lambda plan: (measured[plan]["loss"] - measured[current]["loss"]) / steps[plan])
        path.append(current)


def pareto_front(rows, cost: str, metric: str) -> list:
    """The rows that no other row beats on both `cost` (lower is better) and `metric` (its own direction)."""
    front = []
    for row in sorted(rows, key=lambda row: (row[cost], -quality(row, metric))):
        if not front or quality(row, metric) > quality(front[-1], metric):
            front.append(row)
    return front


def uniform_curve_at(uniform_rows, cost: str, field: str, at: float):
    """`field` of the uniform budgets, linear in `cost` between the two that bracket `at` (None outside them)."""
    points = sorted((row[cost], row[field]) for row in uniform_rows)
    for (low_cost, low), (high_cost, high) in zip(points, points[1:]):
        if low_cost <= at <= high_cost:
            return low + (high - low) * (at - low_cost) / (high_cost - low_cost)
    return None


def per_layer_against_uniform(rows, metric: str, cost="flops_per_token") -> list:
    """Each per-layer plan against the uniform budgets at its cost: the uniform curve is interpolated linearly in
    `cost` between the uniform budgets around it. A positive gain means the per-layer plan is better."""
    uniform = [row for row in rows if row["kind"] == "uniform"]
    comparison = []
    for row in (row for row in rows if row["kind"] == "per-layer"):
        at_cost = {field: uniform_curve_at(uniform, cost, field, row[cost]) for field in (metric, "loss")}
        if at_cost["loss"] is None:
            continue
        comparison.append({"budget": row["budget"], cost: row[cost], metric: row[metric], "loss": row["loss"],
                           f"uniform_{metric}": at_cost[metric], "uniform_loss": at_cost["loss"],
                           f"{metric}_gain": quality(row, metric) - quality(at_cost, metric),
                           "loss_gain": at_cost["loss"] - row["loss"]})
    return comparison


def comparison_table(comparison, metric: str) -> str:
    """per_layer_against_uniform as markdown."""
    lines = [f"| per-layer plan | MFLOPs/token | {metric} | uniform curve there | loss | uniform curve there | "
             "loss gain |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in comparison:
        lines.append(f"| {row['budget']} | {row['flops_per_token'] / 1e6:.3f} | {row[metric]:.4f} | "
                     f"{row[f'uniform_{metric}']:.4f} | {row['loss']:.4f} | {row['uniform_loss']:.4f} | "
                     f"{row['loss_gain']:+.4f} |")
    return "\n".join(lines)


def choose_plan(rows, targets: dict):
    """The plan to deploy under `targets` ({option: limit}, see TARGETS), or None when no plan meets them all.

    With a cost limit: the best quality among the plans within every limit (then the fewest FLOPs). With only a
    quality limit: the fewest FLOPs per token among the plans within it (then the best quality).
    """
    feasible = [row for row in rows if all(row[TARGETS[name]] <= limit for name, limit in targets.items())]
    if not feasible:
        return None
    if set(targets) - {"max_quality_drop"}:
        return min(feasible, key=lambda row: (row["quality_drop"], row["flops_per_token"]))
    return min(feasible, key=lambda row: (row["flops_per_token"], row["quality_drop"]))


# --- the command -------------------------------------------------------------------------------------------------


def check_targets(targets: dict) -> dict:
    targets = {name: limit for name, limit in targets.items() if limit is not None}
    for name, limit in targets.items():
        if name not in TARGETS:
            raise RunConfigError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit < math.inf:
            raise RunConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {limit!r}")
    return targets


def check_destination(path, flag: str) -> Path | None:
    """A new or empty folder to write to, or None when not asked for."""
    if path is None:
        return None
    try:
        return check_new_folder(path, flag)
    except ValueError as error:
        raise RunConfigError(str(error)) from None


def check_plan_request(model_dir, data=None, targets=None, write_default=None, write_slice=None, **sizes):
    """Everything checkable before the data and the weights load; raises RunConfigError or FileNotFoundError.

    sizes: max_eval_samples, batch_size, repeats (None: the default), each a positive integer.
    """
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RunConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    check_data_request(model_dir, data)
    targets = check_targets(targets or {})
    if (write_default or write_slice) and not targets:
        raise RunConfigError("--write-default and --write-slice write the plan chosen for a target: give one, "
                             f"e.g. --max-quality-drop 0.05 (targets: {', '.join(TARGETS)})")
    if write_default and write_slice:
        raise RunConfigError("pass one of --write-default and --write-slice")
    return targets, check_destination(write_default, "--write-default"), check_destination(write_slice,
                                                                                            "--write-slice")


# What a model folder holds beside the model: the tokenizer's files and the run config.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   RUN_CONFIG_NAME)


def save_atomically(model, model_dir, destination: Path) -> None:
    """The model, and the tokenizer and run config of a local `model_dir` when it has them, into `destination`,
    all at once or not at all."""
    with written_atomically(destination) as staging:
        model.save_pretrained(staging)
        for name in COMPANION_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, staging / name)


def plan_budgets(model_dir, data=None, targets=None, write_default=None, write_slice=None, output_dir=None,
                 max_eval_samples=None, batch_size=32, repeats=20, text_column="text", label_column="label",
                 command=None) -> dict:
    """Measure uniform and per-layer plans of the model in `model_dir`, report the frontier, and pick, re-measure
    and optionally write the plan for `targets` ({option: limit}, see TARGETS). Returns the report."""
    targets, default_path, slice_path = check_plan_request(model_dir, data, targets, write_default, write_slice,
                                                           max_eval_samples=max_eval_samples,
                                                           batch_size=batch_size, repeats=repeats)
    dataset, collator, causal_lm, source = evaluation_data(model_dir, data, max_eval_samples, text_column,
                                                           label_column)
    auto_class = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = auto_class.from_pretrained(model_dir).to(device).eval()
    config = model.config
    levels = default_budget_grid(config.num_spectral_filters, config.min_spectral_budget)

    # Integer budgets (the grid; a model sliced per layer caps each layer at its own K); the last is the full one.
    uniform = {}
    for k in levels:
        uniform.setdefault(config.layer_budgets(k), k)
    full = config.layer_budgets(config.num_spectral_filters)
    measured = measure_quality(model, dataset, collator, list(uniform), batch_size, causal_lm)
    searched = greedy_layer_search(model, dataset, collator, levels, batch_size, causal_lm, measured)

    examples = [collator([row]) for row in dataset.select(range(min(len(dataset), 256)))]
    longest = without_labels(max(examples, key=lambda batch: batch["attention_mask"].shape[1]))
    sequence = {name: tensor.to(device) for name, tensor in longest.items()}
    batch = {name: tensor.to(device) for name, tensor in without_labels(collator(
        [dataset[i] for i in range(min(batch_size, len(dataset)))])).items()}
    metric = metric_name([measured[full]])
    rows = []
    for plan in dict.fromkeys([*uniform, *searched]):  # each plan once, in order
        kind = "uniform" if plan in uniform else "per-layer"
        budget = uniform[plan] if kind == "uniform" else list(plan)
        # The search starts from the full budget and may pass through uniform plans too.
        rows.append({"budget": budget, "layer_budgets": list(plan), "kind": kind,
                     "searched": plan == full or plan in searched, **measured[plan],
                     "quality_drop": quality_drop(measured[plan], measured[full], metric),
                     **measure_costs(model, plan, sequence, batch, causal_lm, repeats)})
    report = {
        "settings": {"model_dir": str(model_dir), "data": source,
                     "eval_samples": len(dataset), "levels": list(levels), "batch_size": batch_size,
                     "repeats": repeats, "device": str(model.device), "num_threads": torch.get_num_threads(),
                     "sequence_length": next(iter(sequence.values())).shape[1], "command": command},
        "metric": metric,
        "plans": rows,
        # The plans no other plan beats on both quality and that cost.
        "frontier": {cost: [row["budget"] for row in pareto_front(rows, cost, metric)] for cost in COST_FIELDS},
        "per_layer_against_uniform": per_layer_against_uniform(rows, metric),
    }
    output_dir = Path(output_dir or default_output_dir(model_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    report_path = output_dir / f"{REPORT_NAME}.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    plot_frontier(rows, metric, output_dir / f"{REPORT_NAME}.png", title=str(model_dir))
    print(summary_table(rows, metric))
    print("frontier (no plan is both cheaper and better): " + "; ".join(
        f"{cost}: {report['frontier'][cost]}" for cost in ("flops_per_token", "ms_per_token", "parameters")))
    print(comparison_table(report["per_layer_against_uniform"], metric))
    if targets:
        report["target"] = choose_and_check(model, model_dir, rows, measured[full], targets, dataset, collator,
                                            sequence, batch, causal_lm, batch_size, repeats, default_path, slice_path)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {report_path} and {report_path.with_suffix('.png')}")
    return report


def choose_and_check(model, model_dir, rows, full, targets, dataset, collator, sequence, batch, causal_lm,
                     batch_size, repeats, default_path, slice_path) -> dict:
    """Pick the plan for `targets`, measure it again (quality against `full`'s, and every cost), write it if asked."""
    chosen = choose_plan(rows, targets)
    if chosen is None:
        limits = ", ".join(f"{name}={limit:g}" for name, limit in targets.items())
        raise RunConfigError(f"no measured plan meets {limits}; the frontier of what was measured is in "
                             f"{REPORT_NAME}.json, and no model was written")
    plan = tuple(chosen["layer_budgets"])
    again = measure_quality(model, dataset, collator, [plan], batch_size, causal_lm)[plan]
    remeasured = {**again, "quality_drop": quality_drop(again, full, metric_name([full])),
                  **measure_costs(model, plan, sequence, batch, causal_lm, repeats)}
    met = {name: remeasured[TARGETS[name]] <= limit for name, limit in targets.items()}
    result = {"targets": targets, "chosen": chosen["budget"], "remeasured": remeasured, "met": met}
    if default_path is not None:
        model.config.spectral_budget = chosen["budget"]
        save_atomically(model, model_dir, default_path)
        result["written"] = {"default_budget": str(default_path)}
    elif slice_path is not None:
        save_atomically(model.slice_to_budget(chosen["budget"]), model_dir, slice_path)
        result["written"] = {"slice": str(slice_path)}
    print(f"chosen plan: spectral_budget={chosen['budget']}; re-measured: "
          + ", ".join(f"{name} {'met' if ok else 'MISSED'} ({remeasured[TARGETS[name]]:.4g} <= {targets[name]:g})"
                      for name, ok in met.items()))
    return result


def summary_table(rows, metric: str) -> str:
    lines = [f"| budget | kind | {metric} | drop | parameters | MFLOPs/token | ms/token | ms/sequence | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['budget']} | {row['kind']} | {row[metric]:.4f} | {row['quality_drop']:+.1%} | "
                     f"{row['parameters']:,} | {row['flops_per_token'] / 1e6:.3f} | {row['ms_per_token']:.3f} | "
                     f"{row['ms_per_sequence']:.2f} | {row['peak_memory_mb']:.1f} |")
    return "\n".join(lines)


def plot_frontier(rows, metric: str, path, title: str) -> None:
    """Quality against FLOPs, latency and parameters: the uniform budgets as a line, the per-layer plans as points,
    and the frontier of all plans dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    uniform = sorted((row for row in rows if row["kind"] == "uniform"), key=lambda row: row["budget"])
    per_layer = [row for row in rows if row["kind"] == "per-layer"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, cost, axis_label in zip(axes, ("flops_per_token", "ms_per_token", "parameters"),
                                      ("MFLOPs per token", "ms per token (this machine)", "parameters (M)")):
        scale = 1e-6 if cost in ("flops_per_token", "parameters") else 1.0
        axis.plot([row[cost] * scale for row in uniform], [row[metric] for row in uniform], marker="o",
                  color="tab:blue", label="uniform budgets")
        for row in uniform:
            axis.annotate(str(row["budget"]), (row[cost] * scale, row[metric]), textcoords="offset points",
                          xytext=(3, 3), fontsize=7, color="tab:blue")
        axis.scatter([row[cost] * scale for row in per_layer], [row[metric] for row in per_layer], marker="s",
                     color="tab:orange", s=22, label="per-layer plans (greedy search)", zorder=3)
        front = pareto_front(rows, cost, metric)
        axis.plot([row[cost] * scale for row in front], [row[metric] for row in front], linestyle="--",
                  color="black", linewidth=0.8, label="frontier of all plans")
        axis.set(xlabel=axis_label, ylabel=metric.replace("_", " "))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_title(f"{title}: uniform and per-layer budgets")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


__all__ = ["choose_plan", "flops_per_token", "greedy_layer_search", "pareto_front", "plan_budgets"]
