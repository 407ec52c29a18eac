"""Markdown tables from budget_plan.json reports of `essm-plan` (the tables of docs/budget_planning.md).

    python scripts/compare_plans.py plans REPORT
        every plan of one report: quality, loss, FLOPs per token, parameters
    python scripts/compare_plans.py per-layer LABEL=REPORT [LABEL=REPORT ...]
        per model: how its per-layer plans compare with its uniform budgets at equal FLOPs per token
    python scripts/compare_plans.py draws REPORT_A REPORT_B
        two models of the same shape (e.g. trained with shared and with per-layer budget draws): at the FLOPs of
        each uniform budget, the loss of that budget and of the best plan costing no more, for each model
"""

import argparse
import json
from pathlib import Path

from modeling_essm.planner import per_layer_against_uniform


def load(path):
    return json.loads(Path(path).read_text())


def plans_table(report) -> str:
    metric = report["metric"]
    lines = [f"| plan | {metric.replace('_', ' ')} | loss | MFLOPs/token | parameters |", "|---|---:|---:|---:|---:|"]
    for plan in report["plans"]:
        lines.append(f"| {plan['budget']} | {plan[metric]:.4f} | {plan['loss']:.4f} | "
                     f"{plan['flops_per_token'] / 1e6:.3f} | {plan['parameters']:,} |")
    return "\n".join(lines)


def per_layer_table(labelled_reports) -> str:
    lines = ["| model | per-layer plans | better than uniform | mean loss gain | best | worst |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, report in labelled_reports:
        gains = [row["loss_gain"] for row in per_layer_against_uniform(report["plans"], report["metric"])]
        lines.append(f"| {label} | {len(gains)} | {sum(gain > 0 for gain in gains)} | "
                     f"{sum(gains) / len(gains):+.4f} | {max(gains):+.4f} | {min(gains):+.4f} |")
    return "\n".join(lines)


def best_loss_within(report, flops: float) -> float:
    return min(plan["loss"] for plan in report["plans"] if plan["flops_per_token"] <= flops * (1 + 1e-9))


def draws_table(first, second) -> str:
    lines = ["| k | MFLOPs/token | A: uniform k | A: best plan within | B: uniform k | B: best plan within |",
             "|---:|---:|---:|---:|---:|---:|"]
    second_uniform = {plan["budget"]: plan for plan in second["plans"] if plan["kind"] == "uniform"}
    for plan in (plan for plan in first["plans"] if plan["kind"] == "uniform"):
        flops = plan["flops_per_token"]
        lines.append(f"| {plan['budget']} | {flops / 1e6:.3f} | {plan['loss']:.4f} | "
                     f"{best_loss_within(first, flops):.4f} | {second_uniform[plan['budget']]['loss']:.4f} | "
                     f"{best_loss_within(second, flops):.4f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("plans", "per-layer", "draws"))
    parser.add_argument("reports", nargs="+")
    args = parser.parse_args()
    if args.table == "plans":
        print(plans_table(load(args.reports[0])))
    elif args.table == "per-layer":
        print(per_layer_table([(item.rsplit("=", 1)[0], load(item.rsplit("=", 1)[1])) for item in args.reports]))
    else:
        print(draws_table(load(args.reports[0]), load(args.reports[1])))


if __name__ == "__main__":
    main()
