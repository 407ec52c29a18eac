"""The budget planner (`essm-plan`, `modeling_essm.planner`): quality and cost of uniform and per-layer plans, the
frontier, and the plan chosen for a target, written as a default budget or a slice."""

import json

import pytest
import torch
from conftest import tiny_config
from test_training import write_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from modeling_essm import ESSSMForCausalLM, ESSSMForSequenceClassification, build_fast_tokenizer
from modeling_essm.cli import plan_main
from modeling_essm.evaluation import evaluation_data, measure
from modeling_essm.tasks import listops
from modeling_essm.planner import (
    TARGETS,
    choose_plan,
    flops_per_token,
    greedy_layer_search,
    pareto_front,
    per_layer_against_uniform,
    plan_budgets,
)
from modeling_essm.training import load_run_config, train

K = 16  # num_spectral_filters of tiny_config


def row(budget, accuracy, flops, **costs):
    fields = dict(parameters=flops, ms_per_token=flops, ms_per_sequence=flops, peak_memory_mb=flops)
    return {"budget": budget, "accuracy": accuracy, "quality_drop": (0.5 - accuracy) / 0.5, "flops_per_token": flops,
            **fields, **costs}


def test_the_frontier_keeps_only_plans_no_other_beats_on_both_axes():
    rows = [row(2, 0.30, 1), row(3, 0.28, 2), row(4, 0.40, 3), row([2, 4], 0.40, 4), row(8, 0.50, 5)]
    assert [r["budget"] for r in pareto_front(rows, "flops_per_token", "accuracy")] == [2, 4, 8]
    lm_rows = [{"budget": k, "bits_per_byte": bpb, "flops_per_token": k} for k, bpb in [(2, 3.0), (4, 3.1), (8, 2.5)]]
    assert [r["budget"] for r in pareto_front(lm_rows, "flops_per_token", "bits_per_byte")] == [2, 8]


def test_a_quality_target_picks_the_cheapest_plan_within_it_and_a_cost_target_the_best_within_it():
    rows = [row(2, 0.30, 1), row(4, 0.46, 3), row([2, 4], 0.47, 4), row(8, 0.50, 5)]
    assert choose_plan(rows, {"max_quality_drop": 0.1})["budget"] == 4  # 8% drop, fewest FLOPs
    assert choose_plan(rows, {"max_flops_per_token": 4})["budget"] == [2, 4]  # best accuracy within 4 FLOPs
    assert choose_plan(rows, {"max_params": 4.5, "max_quality_drop": 0.01}) is None
    assert set(TARGETS.values()) <= set(rows[0])


def test_per_layer_plans_are_compared_with_the_uniform_curve_at_their_cost():
    rows = [{**row(k, acc, flops), "loss": loss, "kind": "uniform"}
            for k, acc, flops, loss in [(2, 0.30, 1.0, 2.0), (4, 0.40, 3.0, 1.0)]]
    rows += [{**row([2, 4], 0.38, 2.0), "loss": 1.25, "kind": "per-layer"},
             {**row([4, 8], 0.50, 4.0), "loss": 0.5, "kind": "per-layer"}]  # beyond the uniform budgets: skipped
    (compared,) = per_layer_against_uniform(rows, "accuracy")
    assert compared["budget"] == [2, 4] and compared["uniform_loss"] == pytest.approx(1.5)
    assert compared["loss_gain"] == pytest.approx(0.25) and compared["accuracy_gain"] == pytest.approx(0.03)


def test_flops_count_each_layer_at_its_own_budget():
    config = tiny_config(num_hidden_layers=3)
    per_layer = flops_per_token(config, (2, 9, K), 100)
    by_layer = [flops_per_token(config, (k, k, k), 100) for k in (2, 9, K)]
    assert per_layer == pytest.approx(sum(by_layer) / 3)  # the head is the same in every term
    # One more channel in one layer adds its projection (2 D^2 per token) and its convolution.
    extra = flops_per_token(config, (3, 9, K), 100) - per_layer
    assert extra > 2 * config.hidden_size**2


def test_the_greedy_search_lowers_one_layer_by_one_level_at_a_time_where_the_loss_rises_least():
    torch.manual_seed(0)
    model = ESSSMForSequenceClassification(tiny_config(num_labels=3, initializer_range=0.1)).eval()
    dataset, collator = classification_rows(24)
    levels = (2, 4, 8, K)
    measured = measure(model, dataset, collator, {(K, K): {"spectral_budget": [K, K]}}, 8, False)
    path = greedy_layer_search(model, dataset, collator, levels, 8, False, measured)
    assert path[-1] == (2, 2) and len(path) == 2 * (len(levels) - 1)
    previous = (K, K)
    for plan in path:
        changed = [layer for layer in range(2) if plan[layer] != previous[layer]]
        assert len(changed) == 1 and levels.index(previous[changed[0]]) - levels.index(plan[changed[0]]) == 1
        # Its step was the cheapest in loss per channel among the one-level steps open at that point.
        options = [previous[:layer] + (levels[levels.index(k) - 1],) + previous[layer + 1:]
                   for layer, k in enumerate(previous) if k > 2]
        rise = {option: (measured[option]["loss"] - measured[previous]["loss"]) / (sum(previous) - sum(option))
                for option in options}
        assert rise[plan] == min(rise.values())
        previous = plan


def classification_rows(size):
    from datasets import Dataset

    from modeling_essm.training import PaddingCollator

    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 256, (int(n),), generator=generator).tolist(), "labels": i % 3}
            for i, n in enumerate(torch.randint(10, 30, (size,), generator=generator))]
    return Dataset.from_list(rows), PaddingCollator(pad_token_id=256)


@pytest.fixture(scope="module")
def listops_run(tmp_path_factory):
    """A tiny model trained for a few steps on ListOps by essm-train's code: a folder with a run config."""
    folder = tmp_path_factory.mktemp("listops")
    path = write_config(folder, task={"eval_size": 48},
                        model={"num_hidden_layers": 2, "num_spectral_filters": 8, "hidden_size": 16},
                        training={"max_steps": 6, "disable_tqdm": True, "save_strategy": "no"})
    train(load_run_config(path))
    return folder / "run"


def test_the_planner_reports_uniform_and_searched_plans_with_every_cost(listops_run, tmp_path):
    report = plan_budgets(listops_run, output_dir=tmp_path, repeats=2)
    saved = json.loads((tmp_path / "budget_plan.json").read_text())
    assert saved == json.loads(json.dumps(report)) and (tmp_path / "budget_plan.png").stat().st_size > 10_000
    plans = {json.dumps(r["budget"]): r for r in report["plans"]}
    assert {"2", "3", "4", "6", "8"} <= set(plans) and any(r["kind"] == "per-layer" for r in report["plans"])
    model = AutoModelForSequenceClassification.from_pretrained(listops_run)
    for r in report["plans"]:
        assert r["parameters"] == model.slice_to_budget(r["layer_budgets"]).num_parameters()
        assert r["ms_per_token"] > 0 and r["ms_per_sequence"] > 0 and r["peak_memory_mb"] > 0
    assert plans["8"]["quality_drop"] == 0 and plans["2"]["flops_per_token"] < plans["8"]["flops_per_token"]
    # The quality of each plan is the model's at that budget on the task's eval split.
    dataset, collator, _, _ = evaluation_data(listops_run)
    for r in (plans["4"], next(r for r in report["plans"] if r["kind"] == "per-layer")):
        direct = measure(model.eval(), dataset, collator, {"p": {"spectral_budget": r["budget"]}}, 32, False)["p"]
        assert r["loss"] == pytest.approx(direct["loss"]) and r["accuracy"] == direct["accuracy"]
    assert report["frontier"]["flops_per_token"][0] == 2  # the cheapest plan is always on the frontier


def test_the_chosen_plan_is_written_as_the_default_budget_and_meets_its_target_when_measured_again(listops_run, tmp_path):
    report = plan_budgets(listops_run, targets={"max_quality_drop": 0.2, "max_flops_per_token": 1e9},
                          write_default=tmp_path / "deploy", output_dir=tmp_path, repeats=2)
    target = report["target"]
    assert all(target["met"].values()) and target["remeasured"]["quality_drop"] <= 0.2
    deployed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "deploy").eval()
    assert deployed.config.spectral_budget == target["chosen"]
    expression = "[MAX 2 9 ]"  # the run's tokenizer travels with the model
    assert AutoTokenizer.from_pretrained(tmp_path / "deploy")(expression).input_ids == listops.encode(expression)
    # Measured again by hand, through a plain load: the default budget gives the chosen plan's quality.
    dataset, collator, _, _ = evaluation_data(tmp_path / "deploy")  # the run config travels with the model
    again = measure(deployed, dataset, collator, {"default": {}}, 32, False)["default"]
    full = measure(deployed, dataset, collator, {"full": {"spectral_budget": 8}}, 32, False)["full"]
    assert (full["accuracy"] - again["accuracy"]) / full["accuracy"] <= 0.2
    assert again["loss"] == pytest.approx(target["remeasured"]["loss"])


def test_a_slice_is_written_for_a_parameter_target(listops_run, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(listops_run).eval()
    limit = model.slice_to_budget(5).num_parameters()
    report = plan_budgets(listops_run, targets={"max_params": limit}, write_slice=tmp_path / "small",
                          output_dir=tmp_path, repeats=2)
    small = AutoModelForSequenceClassification.from_pretrained(tmp_path / "small").eval()
    assert small.num_parameters() <= limit and report["target"]["met"] == {"max_params": True}
    x = torch.randint(1, 12, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x, spectral_budget=report["target"]["chosen"]).logits,
                                   atol=1e-5, rtol=1e-5)


def test_the_planner_reads_the_users_own_text_for_a_language_model(tmp_path):
    torch.manual_seed(0)
    ESSSMForCausalLM(tiny_config(num_spectral_filters=6)).save_pretrained(tmp_path / "lm")
    build_fast_tokenizer().save_pretrained(tmp_path / "lm")
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i}: to be, or not to be"}) for i in range(12)))
    report = plan_budgets(tmp_path / "lm", data=data, output_dir=tmp_path, repeats=2, batch_size=4,
                          targets={"max_quality_drop": 0.5}, write_slice=tmp_path / "small")
    assert (tmp_path / "small" / "tokenizer.json").is_file()  # the text model's tokenizer travels with it
    assert report["metric"] == "bits_per_byte" and report["settings"]["eval_samples"] == 12
    assert [r["budget"] for r in report["plans"] if r["kind"] == "uniform"] == [2, 3, 4, 6]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    ids = [list(f"line {i}: to be, or not to be".encode()) for i in range(12)]
    dataset, collator, causal_lm, source = evaluation_data(tmp_path / "lm", data=data)
    assert causal_lm and source == str(data) and dataset["input_ids"] == ids
    direct = measure(model, dataset, collator, {"k": {"spectral_budget": 3}}, 4, True)["k"]
    assert next(r for r in report["plans"] if r["budget"] == 3)["bits_per_byte"] == pytest.approx(
        direct["bits_per_byte"])


@pytest.mark.parametrize("arguments, message", [
    (["--max-quality-drop", "-1"], "--max-quality-drop must be a finite number >= 0"),
    (["--write-default", "{out}"], "write the plan chosen for a target"),
    (["--max-params", "1e6", "--write-slice", "{taken}"], "exists and is not an empty folder"),
    (["--max-params", "1e6", "--write-slice", "{out}", "--write-default", "{out}2"], "pass one of"),
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{bad_data}"], "pass a datasets folder"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
])
def test_bad_requests_end_in_one_line_before_any_work(arguments, message, listops_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.safetensors").write_text("the user's file")
    (tmp_path / "data.txt").write_text("x")
    paths = dict(out=tmp_path / "out", taken=taken, missing=tmp_path / "missing.jsonl", bad_data=tmp_path / "data.txt")
    arguments = [argument.format(**paths) for argument in arguments]
    with pytest.raises(SystemExit) as exit:
        plan_main([str(listops_run), "--output-dir", str(tmp_path / "report"), *arguments])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "report").exists() and not (tmp_path / "out").exists()
    assert (taken / "model.safetensors").read_text() == "the user's file"


def test_a_model_without_a_run_config_needs_data(tmp_path, capsys):
    ESSSMForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        plan_main([str(tmp_path)])
    assert "or your own evaluation data with --data" in capsys.readouterr().err


def test_an_unmet_target_writes_the_frontier_but_no_model(listops_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        plan_main([str(listops_run), "--max-params", "10", "--write-slice", str(tmp_path / "small"),
                   "--output-dir", str(tmp_path), "--repeats", "2"])
    assert exit.value.code == 2 and "no measured plan meets max_params=10" in capsys.readouterr().err
    assert (tmp_path / "budget_plan.json").exists() and not (tmp_path / "small").exists()
