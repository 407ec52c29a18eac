"""The budget explorer's logic without a browser: what it loads and refuses, and that what it shows is the model's
own output at the chosen budget. tests/test_explorer_browser.py drives the served page in Chromium."""

import json

import pytest
import torch
from conftest import save_explorable_lm, tiny_config
from test_training import write_config
from transformers import AutoTokenizer, LlamaConfig

from modeling_essm import ESSSMConfig, ESSSMModel
from modeling_essm import explorer
from modeling_essm.cli import explore_main
from modeling_essm.explorer import (ExplorerError, budget_summary, chosen_budget, cost_curve, curve_figure, encode,
                                    label_distribution, load_explored, measure_sweep, read_input, stream_generation)
from modeling_essm.tasks import listops
from modeling_essm.training import load_run_config, train

K = 16  # num_spectral_filters of tiny_config


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    save_explorable_lm(folder)
    return folder


@pytest.fixture(scope="module")
def lm(lm_folder):
    return load_explored(str(lm_folder))


@pytest.fixture(scope="module")
def listops_run(tmp_path_factory):
    """The main job's kind of output, small: a ListOps classifier trained by essm-train's code, no sweep yet."""
    folder = tmp_path_factory.mktemp("listops")
    train(load_run_config(write_config(folder, task={"eval_size": 24},
                                       model={"num_hidden_layers": 2, "num_spectral_filters": 8},
                                       training={"max_steps": 4, "disable_tqdm": True, "save_strategy": "no"})))
    return folder / "run"


@pytest.fixture(scope="module")
def classifier(listops_run):
    return load_explored(str(listops_run))


def greedy_text(model, tokenizer, prompt, budget, new_tokens):
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(input_ids, spectral_budget=budget, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


# --- what it loads and refuses ---------------------------------------------------------------------------------


def test_a_saved_lm_loads_with_its_tokenizer_and_sweep(lm):
    assert lm.causal_lm and lm.tokenizer is not None
    assert [row["budget"] for row in lm.sweep] == [2, 4, 8, K]
    assert lm.budgets == [2, 4, 8, K]


def test_the_main_jobs_output_loads_as_a_classifier_that_reads_expressions(classifier):
    assert not classifier.causal_lm and classifier.sweep is None
    assert encode(classifier, "[MAX 2 9 ]", 48).tolist() == [listops.encode("[MAX 2 9 ]")]


def not_an_essm(folder):
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(folder)
    return "is not an ES-SSM: its config has model_type='llama'"


def base_model(folder):
    ESSSMModel(tiny_config()).save_pretrained(folder)
    return "ESSSMModel: the explorer shows a causal LM or a sequence classifier"


def real_valued(folder):
    ESSSMConfig(input_size=3, num_labels=2, architectures=["ESSSMForSequenceClassification"]).save_pretrained(folder)
    return "reads real-valued inputs (input_size=3)"


def no_model(folder):
    (folder / "notes.txt").write_text("hello")
    return "holds no saved model (config.json)"


@pytest.mark.parametrize("make", [not_an_essm, base_model, real_valued, no_model])
def test_a_folder_that_is_no_explorable_essm_ends_the_command_in_one_line(make, tmp_path, capsys):
    expected = make(tmp_path)
    with pytest.raises(ExplorerError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_explored(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        explore_main([str(tmp_path), "--port", "7999"])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--port", "0"], "--port must be in [1, 65535]"),
    (["--curve-samples", "0"], "--curve-samples must be a positive integer"),
    (["--data", "missing.jsonl"], "--data missing.jsonl does not exist"),
])
def test_bad_options_end_the_command_before_anything_loads(lm_folder, argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        explore_main([str(lm_folder), *argv])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


# --- inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, room, message", [
    ("", 10, "the input is empty"),
    ("   \n", 10, "the input is empty"),
    ("x" * 11, 10, "the input is 11 tokens long; this model reads at most 10"),
])
def test_empty_and_overlong_inputs_are_refused_with_the_valid_range(lm, text, room, message):
    with pytest.raises(ExplorerError, match=message):
        encode(lm, text, room)


def test_a_word_outside_the_tokenizers_vocabulary_is_refused(classifier):
    with pytest.raises(ExplorerError, match="tokenizer cannot read this input"):
        encode(classifier, "[MAX 2 x ]", 48)


def test_without_a_tokenizer_token_ids_are_typed_and_checked(lm):
    ids_only = type(lm)(name="ids", model=lm.model, tokenizer=None, sweep=None)
    assert encode(ids_only, "1 2 258", 10).tolist() == [[1, 2, 258]]
    with pytest.raises(ExplorerError, match=r"integers in \[0, 258\]"):
        encode(ids_only, "1 two", 10)
    with pytest.raises(ExplorerError, match=r"token ids must be in \[0, 258\]"):
        encode(ids_only, "1 259", 10)


def test_budgets_come_from_the_controls_and_are_checked(lm):
    assert chosen_budget(lm, 4, False, [K, K]) == 4
    assert chosen_budget(lm, 4, True, [2, 8]) == [2, 8]
    with pytest.raises(ExplorerError, match="one per layer"):
        chosen_budget(lm, 4, True, [1, 8])


def test_an_uploaded_file_replaces_the_typed_text(tmp_path):
    (tmp_path / "input.txt").write_text("[MIN 3 4 ]")
    assert read_input("typed", str(tmp_path / "input.txt")) == "[MIN 3 4 ]"
    assert read_input("typed", None) == "typed"
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ExplorerError, match="not a UTF-8 text file"):
        read_input("typed", str(tmp_path / "binary.bin"))


# --- what it shows -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [2, [2, 8], K])
def test_streamed_generation_is_the_models_greedy_generation_at_the_budget(lm, lm_folder, budget, monkeypatch):
    monkeypatch.setattr(explorer, "UPDATE_SECONDS", 0)  # an update for every token
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    updates = list(stream_generation(lm, "To be", budget, 12, 0.0))
    expected = greedy_text(lm.model, tokenizer, "To be", budget, 12)
    assert updates[-1][0] == expected
    assert len(updates) == 12 + 1  # one update a token, then the final one with the peak memory
    assert all(expected.startswith(text) for text, _ in updates[:-1])
    stats = updates[-1][1]
    assert "12 tokens" in stats and "ms/token" in stats and "peak memory" in stats
    assert f"{lm.model.num_parameters_at_budget(budget):,} parameters in use" in stats


def test_updates_are_spaced_so_that_the_page_does_not_slow_the_generation(lm, monkeypatch):
    monkeypatch.setattr(explorer, "UPDATE_SECONDS", 3600)
    updates = list(stream_generation(lm, "To be", 2, 12, 0.0))
    assert len(updates) == 1 and "12 tokens" in updates[0][1]


def test_generation_refuses_a_prompt_that_leaves_no_room_for_the_new_tokens(lm):
    room = lm.config.max_position_embeddings - 100
    with pytest.raises(ExplorerError, match=f"reads at most {room} here"):
        list(stream_generation(lm, "x" * (room + 1), 2, 100, 0.0))
    with pytest.raises(ExplorerError, match=r"new tokens must be in \[1, 127\]"):
        list(stream_generation(lm, "x", 2, 128, 0.0))


def test_the_label_distribution_is_the_classifiers_softmax_at_the_budget(classifier):
    input_ids = encode(classifier, "[MAX 2 9 [MIN 4 7 ] 0 ]", 48)
    for budget in (2, 8):
        shown = label_distribution(classifier, input_ids, budget)
        expected = classifier.model(input_ids, spectral_budget=budget).logits.softmax(-1)[0]
        assert list(shown) == [str(d) for d in range(10)]  # the run's label names
        assert torch.allclose(torch.tensor(list(shown.values())), expected, atol=1e-6)
    assert label_distribution(classifier, input_ids, 2) != label_distribution(classifier, input_ids, None)


def test_the_cost_curve_is_measured_at_every_budget_of_the_curve(lm, classifier):
    for explored in (lm, classifier):
        rows = cost_curve(explored)
        assert [row["budget"] for row in rows] == explored.budgets and all(row["ms"] > 0 for row in rows)
        assert [row["parameters"] for row in rows] == [explored.model.num_parameters_at_budget(k)
                                                        for k in explored.budgets]


def test_the_summary_reads_the_sweep_and_the_measured_cost_at_the_marked_budget(lm):
    lm.costs = [{"budget": k, "ms": 0.5 * k, "parameters": lm.model.num_parameters_at_budget(k)} for k in lm.budgets]
    summary = budget_summary(lm, 4)
    assert f"{lm.model.num_parameters_at_budget(4):,} of {lm.model.num_parameters():,}" in summary
    assert "bits per byte 2.600 in the sweep" in summary and "2.00 ms/token measured here" in summary
    assert "in the sweep" not in budget_summary(lm, [2, 8])  # a per-layer plan is not on the uniform curve
    quality, cost, _ = curve_figure(lm, 4).axes
    assert [line.get_ydata().tolist() for line in quality.lines[:1]] == [[2.8, 2.6, 2.2, 1.4]]
    assert cost.lines[0].get_ydata().tolist() == [1.0, 2.0, 4.0, 8.0]
    assert [line.get_xdata()[0] for line in quality.lines[1:]] == [4]  # the marker


def test_the_curve_is_measured_on_demand_on_the_runs_task(classifier, listops_run):
    rows = measure_sweep(classifier, str(listops_run), samples=8)
    assert [row["budget"] for row in rows] == classifier.budgets
    assert all(0 <= row["accuracy"] <= 1 for row in rows)


def test_the_curve_on_demand_says_what_is_missing_without_data(lm, lm_folder):
    with pytest.raises(ExplorerError, match="start the explorer with --data FILE"):
        measure_sweep(lm, str(lm_folder), samples=8)
    assert json.loads((lm_folder / "budget_sweep.json").read_text())["results"]  # the saved sweep is untouched
