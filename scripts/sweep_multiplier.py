"""Measure `spectral_proj_multiplier` on benchmark tasks: how the default was chosen (docs/training.md).

For each run config and each multiplier c, train the ES-SSM with budget dropout (the config's own
schedule, data and optimiser, with `model.spectral_proj_multiplier=c`), then evaluate it at budgets 2,
4 and K. One JSON per run goes to RESULTS_DIR/<task>-c<c>-steps<steps>.json; `--report` prints the
table of every JSON in RESULTS_DIR.

    OMP_NUM_THREADS=1 python scripts/sweep_multiplier.py configs/bench/listops.yaml --multipliers 1,10,100 --steps 150
    python scripts/sweep_multiplier.py --report
"""

import argparse
import json
import time
from pathlib import Path

from modeling_essm import ESSSMForCausalLM
from modeling_essm.cpu_allocator import (AllocatorRequestError, reuse_freed_memory_in_command,
                                         reuse_freed_memory_requested)
from modeling_essm.evaluation import sweep_budgets
from modeling_essm.training import load_run_config, train

RESULTS_DIR = Path("results/multiplier")


def run(config_path, multiplier, steps, results_dir, overrides=(), tag="", reuses_freed_memory=False):
    name = Path(config_path).stem + (f"-{tag}" if tag else "")
    output_dir = f"outputs/multiplier/{name}-c{multiplier:g}-steps{steps}"
    settings = [f"model.spectral_proj_multiplier={multiplier}", f"training.output_dir={output_dir}",
                "training.disable_tqdm=true", *overrides]
    if steps:
        settings.append(f"training.max_steps={steps}")
    config = load_run_config(config_path, settings)
    start = time.perf_counter()
    trainer, _ = train(config)
    train_seconds = time.perf_counter() - start
    model = trainer.model.eval()
    K = model.config.num_spectral_filters
    causal_lm = isinstance(model, ESSSMForCausalLM)
    rows = sweep_budgets(model, trainer.eval_dataset, trainer.data_collator, [2, 4, K],
                         batch_size=trainer.args.per_device_eval_batch_size, causal_lm=causal_lm)
    train_loss = next(entry["train_loss"] for entry in reversed(trainer.state.log_history) if "train_loss" in entry)
    result = {"task": name, "multiplier": multiplier, "steps": trainer.state.global_step,
              "train_seconds": train_seconds, "train_loss": train_loss, "budgets": rows, "overrides": settings,
              "reuses_freed_memory": reuses_freed_memory}  # changes train_seconds, not the quality
    path = Path(results_dir) / f"{name}-c{multiplier:g}-steps{trainer.state.global_step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("task", "multiplier", "steps")}), [row for row in rows])
    return result


def report(results_dir):
    rows = [json.loads(path.read_text()) for path in sorted(Path(results_dir).glob("*.json"))]
    rows.sort(key=lambda r: (r["task"], r["steps"], r["multiplier"]))
    print("| task | steps | c | metric k=2 | k=4 | k=K | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        metric = "accuracy" if "accuracy" in r["budgets"][0] else "bits_per_byte"
        values = [b[metric] for b in r["budgets"]]
        shown = [f"{100 * v:.1f}%" if metric == "accuracy" else f"{v:.3f}" for v in values]
        print(f"| {r['task']} | {r['steps']} | {r['multiplier']:g} | {' | '.join(shown)} | {r['train_seconds']:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="benchmark run configs")
    parser.add_argument("--multipliers", default="1,10,100", help="comma-separated values of c")
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the config's own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra run-config overrides")
    parser.add_argument("--tag", default="", help="added to the task name of these runs (e.g. for --set variants)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--report", action="store_true", help="print the table of the JSONs in --results-dir")
    args = parser.parse_args()
    if args.report:
        report(args.results_dir)
        return
    try:
        reuse_requested = reuse_freed_memory_requested()
    except AllocatorRequestError as error:
        parser.error(str(error))
    # As essm-train does, so that train_seconds compare with its runs.
    reuses_freed_memory = reuse_freed_memory_in_command(reuse_requested)
    for config_path in args.configs:
        for multiplier in [float(c) for c in args.multipliers.split(",")]:
            run(config_path, multiplier, args.steps, args.results_dir, args.overrides, args.tag, reuses_freed_memory)


if __name__ == "__main__":
    main()
