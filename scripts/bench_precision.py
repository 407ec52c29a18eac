"""Quality and memory of a trained ES-SSM with its spectral projections M_j in bf16 or fp16 instead of float32.

    python scripts/bench_precision.py outputs/bench/lm/essm --budgets 2 4 11 --output docs/bench_precision.json

Every variant is evaluated on the run's eval split (its run_config.yaml) at each budget, in one process:

- `float32`: the model as trained.
- `M_j rounded to bf16` / `fp16`: every M_j rounded to that dtype and back, everything else float32: the error
  that storing the M_j in half precision adds, alone.
- `dtype=bfloat16`: `from_pretrained(..., dtype=torch.bfloat16)`: every weight in bf16 except what the model
  keeps in float32 (the M_j, filters and eigenvalues).
- `dtype=bfloat16, M_j too`: the same with the M_j in bf16 as well (filters and eigenvalues stay float32).

The memory column is the bytes of all parameters and buffers of the variant as it would be stored.
"""

import argparse
import json
from pathlib import Path

import torch

from modeling_essm.evaluation import auto_class_for, metric_name, sweep_budgets
from modeling_essm.tasks import load_task
from modeling_essm.training import RUN_CONFIG_NAME, collator_for, is_language_model, load_run_config


def tensor_bytes(model, projections_dtype=None):
    """Bytes of every parameter and buffer; the M_j counted at `projections_dtype` when given."""
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        itemsize = tensor.element_size()
        if projections_dtype is not None and name.endswith("spectral_proj"):
            itemsize = torch.empty(0, dtype=projections_dtype).element_size()
        total += tensor.numel() * itemsize
    return total


def round_projections(model, dtype):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("spectral_proj"):
                parameter.copy_(parameter.to(dtype).float())
    return model


def projections_to(model, dtype):
    for module in model.modules():
        if hasattr(module, "spectral_proj"):
            module.spectral_proj.data = module.spectral_proj.data.to(dtype)
    return model


def variants(auto_class, model_dir):
    """(name, model, stored bytes) of every variant, built one at a time."""

    def load(**kwargs):
        return auto_class.from_pretrained(model_dir, **kwargs).eval()

    model = load()
    yield "float32", model, tensor_bytes(model)
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        yield f"M_j rounded to {label}", round_projections(load(), dtype), tensor_bytes(model, dtype)
    model = load(dtype=torch.bfloat16)
    yield "dtype=bfloat16", model, tensor_bytes(model)
    model = projections_to(load(dtype=torch.bfloat16), torch.bfloat16)
    yield "dtype=bfloat16, M_j too", model, tensor_bytes(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="output_dir of a training run (holds the model and run_config.yaml)")
    parser.add_argument("--budgets", type=int, nargs="+", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", help="write the rows here as JSON")
    args = parser.parse_args()
    task_section = dict(load_run_config(Path(args.model_dir) / RUN_CONFIG_NAME)["task"])
    task = load_task(task_section.pop("name"), **task_section)
    rows = []
    for name, model, stored in variants(auto_class_for(task), args.model_dir):
        sweep = sweep_budgets(model, task.eval, collator_for(task), args.budgets, args.batch_size,
                              causal_lm=is_language_model(task))
        metric = metric_name(sweep)
        rows.append({"variant": name, "stored_mb": stored / 2**20, "metric": metric,
                     "by_budget": {row["budget"]: {metric: row[metric], "loss": row["loss"]} for row in sweep}})
    reference = rows[0]["by_budget"]
    print(f"| variant | stored MB | " + " | ".join(f"{rows[0]['metric']} k={k} (change)" for k in args.budgets) + " |")
    print("|---|---:|" + "---:|" * len(args.budgets))
    for row in rows:
        cells = [f"{row['by_budget'][k][row['metric']]:.4f} ({row['by_budget'][k][row['metric']] - reference[k][row['metric']]:+.4f})"
                 for k in args.budgets]
        print(f"| {row['variant']} | {row['stored_mb']:.2f} | " + " | ".join(cells) + " |")
    if args.output:
        Path(args.output).write_text(json.dumps({"model_dir": args.model_dir, "eval_samples": len(task.eval),
                                                 "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
