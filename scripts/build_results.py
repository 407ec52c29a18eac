"""Build docs/results.md and its plots from the comparison results: `python scripts/build_results.py`.

Reads `results/<task>/<model>.json` as `essm-compare` writes them. Every number on the page
comes from those files; a task or model without one is listed as not yet run.
"""

import argparse
import json
from pathlib import Path

from modeling_essm.compare import ESSM_MODELS, MODELS
from modeling_essm.tasks import BENCHMARK_TASKS
from modeling_essm.training import RECIPE_DEFAULTS


TITLES = {
    "listops": "ListOps (generated, LRA rules)",
    "text": "Text (IMDb reviews as bytes)",
    "image": "Image (CIFAR-10 JPEG, grayscale pixel sequences)",
    "audio": "Audio (Free Spoken Digit, raw 8 kHz waveform)",
    "lm": "Language modelling (Tiny Shakespeare bytes)",
}
DESCRIPTIONS = {
    "essm": "ES-SSM trained with budget dropout (paper schedule); its row is the full budget K",
    "essm-fixed": "the same ES-SSM trained only at the full budget K (the non-elastic ablation)",
    "llama": "Transformer: Llama with SDPA attention, parameter count matched within 10%",
    "mamba": "Mamba without CUDA kernels (transformers' PyTorch path; the parallel scan of `mambapy` where "
    "installed, see `settings.versions` in each JSON), parameter count matched within 10%",
}
LANGUAGE_MODELLING_TASK = "lm"
# The quality targets, per metric: the full budget against the Transformer, what budgets 4 and 2 keep of the
# full budget, and how far the fixed-budget ablation at budget 4 falls below budget-dropout training.
TARGETS = {
    "accuracy": {"against_llama": 0.0, "kept": {4: 0.95, 2: 0.85}, "ablation_gap": 10.0},  # points
    "bits_per_byte": {"against_llama": 0.18, "kept": {4: 0.05, 2: 0.12}, "ablation_gap": 0.5},  # bits per byte
}
# Runs repeated with another seed (training.seed and budget.seed = 1, the same data) to tell results from noise:
# (label, model, its results directory for each seed, seed 0 first), relative to the results directory.
SEED_RUNS = (
    ("essm, paper schedule", "essm", (".", "seeds/seed1")),
    ("essm, `budget.bias: 2`", "essm", ("recipes/bias2", "seeds/seed1-bias2")),
    ("llama", "llama", (".", "seeds/seed1")),
)
SEED_TABLE_BUDGETS = (2, 4, None)  # None: the full budget


def load_results(results_dir):
    """{task: {model: result}} for every JSON present, tasks and models in the canonical order."""
    results = {}
    for task in BENCHMARK_TASKS:
        found = {model: Path(results_dir, task, f"{model}.json") for model in MODELS}
        loaded = {model: json.loads(path.read_text()) for model, path in found.items() if path.is_file()}
        if loaded:
            results[task] = loaded
    return results


def compare_command(task, results=None):
    """The command that runs a task; with ESSM_REUSE_FREED_MEMORY=1 when every run in `results` ({model: result})
    had glibc keep freed memory for reuse, so that its speeds reproduce too (the quality does not depend on it)."""
    reused = bool(results) and all(result["settings"].get("reuses_freed_memory") for result in results.values())
    prefix = "ESSM_REUSE_FREED_MEMORY=1 " if reused else ""
    return f"{prefix}OMP_NUM_THREADS=1 essm-compare configs/bench/{task}.yaml"


def metric_label(metric):
    return "accuracy" if metric == "accuracy" else "bits per byte (lower is better)"


def format_metric(result, value):
    return f"{100 * value:.1f}%" if result["metric"] == "accuracy" else f"{value:.3f}"


def settings_line(result):
    config = result["settings"]["run_config"]
    task, training = config["task"], config["training"]
    window = f"{task['min_length']}-{task['max_length']}" if "min_length" in task else f"up to {task.get('max_length')}"
    # Results from before the field existed ran with the M_j unscaled.
    multiplier = result["model_config"].get("spectral_proj_multiplier", 1) if result["model"] in ESSM_MODELS else 1
    scaled = f" (the ES-SSM's spectral_proj_multiplier: {multiplier:g})" if multiplier != 1 else ""
    return (
        f"Sequence length {window}, {task.get('train_size') or 'all'} training / {result['settings']['eval_samples']} "
        f"evaluation examples, {training.get('max_steps')} steps of batch {training.get('per_device_train_batch_size')}, "
        f"learning rate {training.get('learning_rate')}{scaled}, "
        f"{result['settings']['num_threads']} torch thread(s)."
    )


def comparable_settings(result):
    """What must agree between the models of a task: data, training arguments and recipe.

    Not the model section: the baselines take only their size from it (matched parameter counts).
    """
    config = result["settings"]["run_config"]
    training = {key: value for key, value in config["training"].items() if key != "output_dir"}
    # Runs from before the recipe section existed trained with its defaults; the budget options are ES-SSM only.
    recipe = {key: value for key, value in {**RECIPE_DEFAULTS, **config.get("recipe", {})}.items()
              if key not in ("sandwich", "distillation", "eval_budgets")}
    return config["task"], training, recipe


def model_table(results):
    metric = next(iter(results.values()))["metric"]
    lines = [
        f"| model | parameters | layers x width | {metric_label(metric)} | final train loss | eval tokens/s | "
        "train time | s/step | steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in MODELS:
        if model not in results:
            lines.append(f"| {model} | not yet run | | | | | | | |")
            continue
        result = results[model]
        config = result["model_config"]
        lines.append(
            f"| {model} | {result['parameters']:,} | {config['num_hidden_layers']} x {config['hidden_size']} | "
            f"{format_metric(result, result[result['metric']])} | {result['train_loss']:.3f} | "
            f"{result['tokens_per_second']:,.0f} | "
            f"{result['train_seconds'] / 60:.1f} min | {result['seconds_per_step']:.2f} | {result['train_steps']} |"
        )
    return "\n".join(lines)


def budget_table(results):
    variants = [model for model in ("essm", "essm-fixed") if model in results]
    curves = {model: {row["budget"]: row for row in results[model]["budgets"]} for model in variants}
    budgets = sorted({budget for curve in curves.values() for budget in curve})
    header = "| budget k | parameters | " + " | ".join(variants) + " |"
    lines = [header, "|---:|---:|" + "---:|" * len(variants)]
    for budget in budgets:
        parameters = next(curve[budget]["parameters"] for curve in curves.values() if budget in curve)
        cells = [format_metric(results[m], curves[m][budget][results[m]["metric"]]) if budget in curves[m] else "" for m in variants]
        lines.append(f"| {budget} | {parameters:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_at(result, budget):
    """The result's metric at a budget of its sweep (None if not swept), or its headline metric for budget None."""
    if budget is None:
        return result[result["metric"]]
    row = next((row for row in result.get("budgets") or [] if row["budget"] == budget), None)
    return None if row is None else row[result["metric"]]


def summary_table(results):
    """One row per task: the full-budget and k=4 results of both ES-SSM variants beside the two baselines."""
    columns = [("essm", None), ("essm", 4), ("essm-fixed", None), ("essm-fixed", 4), ("llama", None), ("mamba", None)]
    header = " | ".join(model if budget is None else f"{model} k=4" for model, budget in columns)
    lines = [f"| task | metric | {header} |", "|---|---|" + "---:|" * len(columns)]
    for task in BENCHMARK_TASKS:
        task_results = results.get(task, {})
        cells = []
        for model, budget in columns:
            result = task_results.get(model)
            value = None if result is None else metric_at(result, budget)
            cells.append("not yet run" if value is None else format_metric(result, value))
        metric = "bits per byte" if task == LANGUAGE_MODELLING_TASK else "accuracy"
        lines.append(f"| {TITLES[task].split(' (')[0]} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(results):
    """The quality targets of a task's ES-SSM, each with its numbers, met or not."""
    essm, fixed, llama = results.get("essm"), results.get("essm-fixed"), results.get("llama")
    if essm is None:
        return []
    accuracy = essm["metric"] == "accuracy"
    targets, full = TARGETS[essm["metric"]], essm[essm["metric"]]
    checks = []

    def check(claim, met):
        checks.append(f"{claim}: {'met' if met else 'missed'}")

    if llama:
        if accuracy:
            check(f"ES-SSM at full budget ({100 * full:.1f}%) at least matches the Transformer "
                  f"({100 * llama['accuracy']:.1f}%)", full >= llama["accuracy"])
        else:
            gap = full - llama["bits_per_byte"]
            check(f"ES-SSM at full budget is {gap:.3f} bits per byte behind the Transformer "
                  f"(target at most {targets['against_llama']})", gap <= targets["against_llama"])
    for budget, target in targets["kept"].items():
        value = metric_at(essm, budget)
        if value is None:
            continue
        if accuracy:
            check(f"ES-SSM at k={budget} keeps {100 * value / full:.1f}% of its full-budget accuracy "
                  f"(target {100 * target:.0f}%)", value / full >= target)
        else:
            check(f"ES-SSM at k={budget} is {100 * (value / full - 1):.1f}% above its full-budget bits per byte "
                  f"(target within {100 * target:.0f}%)", value / full - 1 <= target)
    essm_4, fixed_4 = metric_at(essm, 4), fixed and metric_at(fixed, 4)
    if essm_4 is not None and fixed_4 is not None:
        if accuracy:
            gap = 100 * (essm_4 - fixed_4)
            check(f"ES-SSM at k=4 is {gap:.1f} points above the ablation at k=4 "
                  f"(target at least {targets['ablation_gap']:g})", gap >= targets["ablation_gap"])
        else:
            gap = fixed_4 - essm_4
            check(f"ES-SSM at k=4 is {gap:.3f} bits per byte below the ablation at k=4 "
                  f"(target at least {targets['ablation_gap']:g})", gap >= targets["ablation_gap"])
    if essm.get("budgets"):
        values = [(1 if accuracy else -1) * row[essm["metric"]] for row in essm["budgets"]]
        worst = max((a - b for a, b in zip(values, values[1:])), default=0.0)
        shown = f"{100 * max(worst, 0.0):.1f} points" if accuracy else f"{max(worst, 0.0):.3f} bits per byte"
        checks.append(f"largest loss of the ES-SSM curve as the budget grows: {shown} (monotone up to noise when small)")
    return checks


def seed_table(results_dir, task):
    """Budgets 2, 4 and K of each repeated run: a row per seed and, given two or more, their mean; None when the
    task has no second seed."""
    runs = []
    for label, model, seed_dirs in SEED_RUNS:
        paths = [Path(results_dir, seed_dir, task, f"{model}.json") for seed_dir in seed_dirs]
        seeds = [(seed, json.loads(path.read_text())) for seed, path in enumerate(paths) if path.is_file()]
        if seeds:
            runs.append((label, seeds))
    if not any(seed > 0 for _, seeds in runs for seed, _ in seeds):
        return None
    columns = ["K" if budget is None else f"k={budget}" for budget in SEED_TABLE_BUDGETS]
    lines = ["| run | seed | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for label, seeds in runs:
        values = [[metric_at(result, budget) for budget in SEED_TABLE_BUDGETS] for _, result in seeds]
        result = seeds[0][1]
        for (seed, _), row in zip(seeds, values):
            cells = ["" if value is None else format_metric(result, value) for value in row]
            lines.append(f"| {label} | {seed} | " + " | ".join(cells) + " |")
        if len(seeds) > 1:
            cells = ["" if None in column else format_metric(result, sum(column) / len(column)) for column in zip(*values)]
            lines.append(f"| {label} | mean | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_task(task, results, path):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    metric = next(iter(results.values()))["metric"]
    scale = 100 if metric == "accuracy" else 1
    figure, axis = plt.subplots(figsize=(6, 4))
    for model, style in (("essm", "o-"), ("essm-fixed", "s--")):
        if model in results:
            rows = results[model]["budgets"]
            axis.plot([r["budget"] for r in rows], [scale * r[metric] for r in rows], style, label=model)
    for model, color in (("llama", "tab:green"), ("mamba", "tab:red")):
        if model in results:
            axis.axhline(scale * results[model][metric], color=color, linestyle=":", label=f"{model} (no budget)")
    budgets = sorted({r["budget"] for m in ("essm", "essm-fixed") if m in results for r in results[m]["budgets"]})
    axis.set_xscale("log", base=2)
    if budgets:
        axis.set_xticks(budgets, [str(k) for k in budgets])
    ylabel = "accuracy (%)" if metric == "accuracy" else metric_label(metric)
    axis.set(xlabel="spectral budget k", ylabel=ylabel, title=f"{task}: small-scale CPU run")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def task_section(task, results, docs_dir, notes=None, seeds=None):
    lines = [f"## {TITLES[task]}", ""]
    if not results:
        return lines + [f"Not yet run. Run `{compare_command(task)}`, then rebuild this page.", ""]
    first = results.get("essm") or next(iter(results.values()))
    lines += [settings_line(first), ""]
    if len({json.dumps(comparable_settings(r), sort_keys=True) for r in results.values()}) > 1:
        lines += ["**The models of this task ran with different settings**: see the JSON files before comparing.", ""]
    lines += [model_table(results), ""]
    if "essm" in results or "essm-fixed" in results:
        plot_name = f"results_{task}.png"
        plot_task(task, results, Path(docs_dir) / plot_name)
        lines += ["One model per variant, evaluated at every budget:", "", budget_table(results), "",
                  f"![{task} budget curves]({plot_name})", ""]
    checks = target_checks(results)
    if checks:
        lines += [f"- {check}" for check in checks] + [""]
    if seeds:
        lines += ["The same runs with a second seed (`--set training.seed=1 --set budget.seed=1`, the same data; "
                  "`results/seeds/`):", "", seeds, ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += [f"Reproduce: `{compare_command(task, results)}`", ""]
    return lines


def read_notes(results_dir, task):
    """What the people who ran a task observed, kept beside its JSON in `<task>/NOTES.md`."""
    path = Path(results_dir, task, "NOTES.md")
    return path.read_text() if path.is_file() else None


def render(results, docs_dir, results_dir):
    lines = [
        "# ES-SSM vs Transformer vs Mamba: small-scale CPU runs",
        "",
        "**These are small-scale runs on a 2-core CPU machine shared with other work, not the paper's "
        "setting**: models of a few hundred thousand parameters trained for minutes on shortened "
        "sequences. Each task states its sequence length, data sizes and steps. Every number below "
        "is read from `results/<task>/<model>.json` (second seeds from `results/seeds/`); tasks and models without "
        "results are marked \"not yet run\".",
        "",
        "Models, trained with the same data, steps and optimiser (each task's settings line gives the ES-SSM's "
        "spectral_proj_multiplier; the baselines are matched to its parameter count at full budget):",
        "",
        *[f"- `{model}`: {DESCRIPTIONS[model]}" for model in MODELS],
        "",
        "Data substitutes: ListOps is generated with LRA's rules but a shorter length window; CIFAR-10 "
        "comes as re-encoded JPEGs (\"CIFAR-10 (JPEG)\"); audio and text are cropped to the configured "
        "length. Eval tokens/s is measured per model at different times on a shared machine: treat "
        "ratios between models as rough.",
        "",
        "Reproduce everything (one thread per process is faster on a busy 2-core machine; the `bench` extra "
        "installs `mambapy`, whose parallel scan trains Mamba about 10x faster on CPU; `ESSM_REUSE_FREED_MEMORY=1` "
        "where the recorded runs had glibc keep freed memory for reuse, which changes speeds, not results):",
        "",
        "```",
        'pip install -e ".[bench]"',
        *[compare_command(task, results.get(task)) for task in BENCHMARK_TASKS],
        "python scripts/build_results.py",
        "```",
        "",
        "At a glance (full budget K unless marked k=4; each task's section has the details, the targets and notes):",
        "",
        summary_table(results),
        "",
    ]
    for task in BENCHMARK_TASKS:
        lines += task_section(task, results.get(task, {}), docs_dir, read_notes(results_dir, task),
                              seed_table(results_dir, task))
    return "\n".join(lines)


def build(results_dir="results", docs_dir="docs"):
    Path(docs_dir).mkdir(parents=True, exist_ok=True)
    path = Path(docs_dir) / "results.md"
    path.write_text(render(load_results(results_dir), docs_dir, results_dir))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build docs/results.md and its plots from results/<task>/<model>.json.")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--docs-dir", default="docs")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.results_dir, args.docs_dir)}")


if __name__ == "__main__":
    main()
