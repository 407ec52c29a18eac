import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_trainer import NUM_FILTERS, free_port, record_budgets, tiny_dataset, tiny_model, tiny_trainer
from transformers import TrainerCallback

from modeling_essm.budget import BudgetSampler, BudgetSamplingCallback, default_budget_grid
from modeling_essm.training import PaddingCollator, budget_counts


NUM_DRAWS = 10_000


def paper_snap_probabilities(grid, min_budget, num_filters, bias=0.6):
    """P(grid value) for one free (non-forced) paper draw, from the schedule's formula.

    k = min * (K / min) ** u' with u' = 1 - (1 - u) ** (1 / bias), so P(u' <= x) = 1 - (1 - x) ** bias,
    and a grid value g_i wins for k between the midpoints to its neighbours.
    """

    def cdf(budget):
        x = math.log(budget / min_budget) / math.log(num_filters / min_budget)
        x = min(max(x, 0.0), 1.0)
        return 1.0 - (1.0 - x) ** bias

    edges = [min_budget] + [(a + b) / 2 for a, b in zip(grid, grid[1:])] + [num_filters]
    return {g: cdf(hi) - cdf(lo) for g, lo, hi in zip(grid, edges, edges[1:])}


def frequencies(sampler, steps):
    counts = Counter(sampler(step) for step in steps)
    return {k: n / len(steps) for k, n in counts.items()}


def assert_close_frequencies(observed, expected, tolerance=0.01):
    assert set(observed) <= set(expected), f"drew budgets outside the schedule: {set(observed) - set(expected)}"
    for k, p in expected.items():
        assert abs(observed.get(k, 0.0) - p) < tolerance, f"budget {k}: observed {observed.get(k, 0.0):.4f}, expected {p:.4f}"


def test_default_grid_is_clipped_and_always_contains_k():
    assert default_budget_grid(32) == (2, 3, 4, 6, 8, 12, 16, 24, 32)
    assert default_budget_grid(10) == (2, 3, 4, 6, 8, 10)
    assert default_budget_grid(64, min_budget=5) == (6, 8, 12, 16, 24, 32, 64)


def test_paper_schedule_frequencies_match_the_formula():
    sampler = BudgetSampler("paper", num_filters=32, full_every=8, seed=1)
    free = paper_snap_probabilities(sampler.grid, 2, 32)
    # Every 8th step is forced to K, the other 7 of 8 follow the biased log-uniform draw.
    expected = {k: 7 / 8 * p + (1 / 8 if k == 32 else 0.0) for k, p in free.items()}
    assert_close_frequencies(frequencies(sampler, range(NUM_DRAWS)), expected)


def test_paper_free_draws_without_forced_full_steps():
    sampler = BudgetSampler("paper", num_filters=16, min_budget=3, full_every=0, seed=7)
    assert sampler.grid == (3, 4, 6, 8, 12, 16)
    expected = paper_snap_probabilities(sampler.grid, 3, 16)
    assert_close_frequencies(frequencies(sampler, range(NUM_DRAWS)), expected)


@pytest.mark.parametrize("bias", [1.0, 2.0])
def test_paper_schedule_bias_moves_draws_towards_small_budgets(bias):
    sampler = BudgetSampler("paper", num_filters=32, full_every=0, seed=5, bias=bias)
    expected = paper_snap_probabilities(sampler.grid, 2, 32, bias=bias)
    assert_close_frequencies(frequencies(sampler, range(NUM_DRAWS)), expected)
    assert expected[2] > paper_snap_probabilities(sampler.grid, 2, 32)[2]  # more small budgets than the paper's


@pytest.mark.parametrize("bias", [0, -1.0, True, "1"])
def test_bad_bias_is_refused(bias):
    with pytest.raises(ValueError, match="bias must be a positive number"):
        BudgetSampler("paper", bias=bias)


def test_uniform_schedule_frequencies():
    sampler = BudgetSampler("uniform", num_filters=32, full_every=0, seed=3)
    expected = {k: 1 / len(sampler.grid) for k in sampler.grid}
    assert_close_frequencies(frequencies(sampler, range(NUM_DRAWS)), expected)


def test_snap_ties_go_to_the_smaller_budget():
    sampler = BudgetSampler(num_filters=32)
    assert sampler.snap_to_grid(2.5) == 2
    assert sampler.snap_to_grid(5.0) == 4
    assert sampler.snap_to_grid(5.01) == 6
    assert sampler.snap_to_grid(28.0) == 24


def test_warmup_and_full_every_use_the_full_budget():
    sampler = BudgetSampler("uniform", num_filters=32, warmup_steps=5, full_every=4, seed=0)
    draws = [sampler(step) for step in range(200)]
    assert draws[:5] == [32] * 5
    assert all(draws[step] == 32 for step in range(7, 200, 4))
    assert len(set(draws[5:])) > 3


def test_fixed_schedule():
    sampler = BudgetSampler("fixed", num_filters=32, fixed_budget=6, warmup_steps=3)
    assert {sampler(step) for step in range(100)} == {6}


def test_draws_are_a_pure_function_of_seed_and_step():
    sampler = BudgetSampler(seed=11)
    forward = [sampler(step) for step in range(500)]
    # Replaying out of order, or with a fresh sampler (a resumed run, another rank), gives the same draws.
    resumed = BudgetSampler(seed=11)
    assert [resumed(step) for step in reversed(range(500))][::-1] == forward
    assert [resumed(step) for step in range(250, 500)] == forward[250:]
    assert [BudgetSampler(seed=12)(step) for step in range(500)] != forward


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schedule": "cosine"}, "valid schedules are paper, uniform, fixed"),
        ({"grid": [2, 4, 64]}, r"grid value 64 is outside \[min_budget, num_filters\] = \[2, 32\]"),
        ({"grid": [1, 4]}, "grid value 1 is outside"),
        ({"grid": [2, 4.5]}, "grid value 4.5 is outside"),
        ({"grid": []}, "must not be empty"),
        ({"schedule": "fixed"}, "needs an integer fixed_budget"),
        ({"schedule": "fixed", "fixed_budget": 33}, "fixed_budget 33 is outside"),
        ({"fixed_budget": 4}, "only used by schedule='fixed'"),
        ({"min_budget": 40}, "must not exceed num_filters"),
        ({"full_every": -1}, "full_every must be an integer >= 0"),
        ({"warmup_steps": 1.5}, "warmup_steps must be an integer >= 0"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BudgetSampler(**kwargs)


# ---- BudgetSamplingCallback under the Trainer ----


def training_budgets(records):
    return [(step, budget) for step, training, budget in records if training]


def test_gradient_accumulation_steps_share_one_budget(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=6, gradient_accumulation_steps=2)
    records = record_budgets(trainer)
    trainer.train()
    sampler = BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=0)
    expected = [(step, sampler(step)) for step in range(6) for _micro_batch in range(2)]
    assert training_budgets(records) == expected
    assert len({budget for _, budget in expected}) > 1


class GradientCheck(TrainerCallback):
    """Before each optimizer step, checks that the channels above the step's budget got exactly zero gradient."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.checked_budgets = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        budget = self.sampler(state.global_step)
        for layer in model.model.layers:
            mixer = layer.mixer
            for parameter in (mixer.spectral_proj, mixer.gate_out.weight, mixer.gate_out.bias):
                assert parameter.grad[:budget].abs().sum() > 0
                assert torch.count_nonzero(parameter.grad[budget:]) == 0
        self.checked_budgets.append(budget)


def test_channels_above_the_budget_get_zero_gradient(tmp_path):
    sampler = BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=5)
    check = GradientCheck(sampler)
    trainer = tiny_trainer(tmp_path, sampler=sampler, callbacks=[check], max_steps=6, gradient_accumulation_steps=2)
    trainer.train()
    assert len(check.checked_budgets) == 6
    assert min(check.checked_budgets) < NUM_FILTERS


def test_budget_counts_reach_the_log_history(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=7, logging_steps=3)
    trainer.train()
    sampler = BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=0)
    assert budget_counts(trainer.state.log_history) == dict(sorted(Counter(sampler(s) for s in range(7)).items()))
    first_log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert sum(n for key, n in first_log.items() if key.startswith("budget_count_")) == 3


def test_evaluation_runs_at_the_full_budget_and_config_is_untouched(tmp_path):
    model = tiny_model()
    fields_before = set(model.config.to_dict())
    trainer = tiny_trainer(tmp_path, model=model, max_steps=4, eval_strategy="steps", eval_steps=2)
    records = record_budgets(trainer)
    trainer.train()
    trainer.evaluate()
    evaluation_budgets = {budget for _, training, budget in records if not training}
    assert evaluation_budgets == {None}  # None is the full budget K
    assert {budget for _, budget in training_budgets(records)} != {None}
    assert not model._forward_pre_hooks
    # The step's budget lives in a hook, never in the config (which would be saved with the checkpoint).
    assert set(model.config.to_dict()) == fields_before
    assert model.config.num_spectral_filters == NUM_FILTERS


class ProbeDuringStep(TrainerCallback):
    """Calls the model in the middle of each optimizer step, once without a budget and once with budget 3."""

    def __init__(self, batch):
        self.batch = batch

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            model(**self.batch)
            model(**self.batch, spectral_budget=3)


def test_an_explicit_budget_wins_over_the_step_budget(tmp_path):
    batch = PaddingCollator(pad_token_id=0)([tiny_dataset(1)[0]])
    trainer = tiny_trainer(tmp_path, callbacks=[ProbeDuringStep(batch)], max_steps=4)
    records = record_budgets(trainer)
    trainer.train()
    sampler = BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=0)
    # Per step: the training forward and the probe without a budget get the draw, the explicit probe keeps 3.
    assert training_budgets(records) == [(s, k) for s in range(4) for k in (sampler(s), sampler(s), 3)]


def test_resumed_run_replays_the_schedule(tmp_path):
    first = tiny_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first_records = record_budgets(first)
    first.train()
    resumed = tiny_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    resumed_records = record_budgets(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert training_budgets(resumed_records) == [r for r in training_budgets(first_records) if r[0] >= 2]
    assert [step for step, _ in training_budgets(resumed_records)] == [2, 3]


def test_sampler_must_match_the_model(tmp_path):
    trainer = tiny_trainer(tmp_path, sampler=BudgetSampler(num_filters=32))
    with pytest.raises(ValueError, match="built for K=32 spectral filters but the model has num_spectral_filters=8"):
        trainer.train()


def test_default_sampler_follows_the_model_config(tmp_path):
    callback = BudgetSamplingCallback()
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.callback_handler.remove_callback(BudgetSamplingCallback)
    trainer.add_callback(callback)
    trainer.train()
    assert callback._active_sampler.num_filters == NUM_FILTERS
    assert callback._active_sampler.schedule == "paper"


def test_torchrun_ranks_agree_on_every_budget(tmp_path):
    worker = Path(__file__).with_name("tiny_trainer.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    result = subprocess.run([*command, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"budgets_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["world_size"] == 2 and rank["parallel_mode"] == "ParallelMode.DISTRIBUTED" for rank in ranks)
    budgets = [training_budgets(rank["records"]) for rank in ranks]
    assert budgets[0] == budgets[1]
    assert [step for step, _ in budgets[0]] == [step for step in range(6) for _ in range(2)]


# ---- per-layer draws ----


def test_per_layer_draws_give_each_layer_its_own_budget_and_keep_the_first_layers_draw():
    shared = BudgetSampler(num_filters=32, seed=3, warmup_steps=2, full_every=4)
    per_layer = BudgetSampler(num_filters=32, seed=3, warmup_steps=2, full_every=4, per_layer=True, num_layers=3)
    draws = [per_layer(step) for step in range(400)]
    assert draws[:2] == [32, 32] and draws[3] == 32  # warm-up and forced full steps: every layer at K
    free = [draw for step, draw in enumerate(draws) if step >= 2 and (step + 1) % 4]
    assert all(isinstance(draw, tuple) and len(draw) == 3 for draw in free)
    assert [draw[0] for draw in free] == [shared(step) for step in range(2, 400) if (step + 1) % 4]
    assert sum(len(set(draw)) > 1 for draw in free) > 0.8 * len(free)  # the layers differ on most steps
    assert draws == [per_layer(step) for step in range(400)]  # a pure function of (seed, step)
    assert per_layer.counted_budgets(3) == [32, 32, 32] and per_layer.counted_budgets(5) == list(draws[5])
    with pytest.raises(ValueError, match="per_layer must be true or false"):
        BudgetSampler(per_layer="yes")
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1"):
        BudgetSampler(per_layer=True, num_layers=0)


def test_per_layer_draws_reach_the_model_and_are_counted_per_layer(tmp_path):
    sampler = BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=0, per_layer=True, num_layers=2)
    trainer = tiny_trainer(tmp_path, sampler=sampler, max_steps=5, logging_steps=5)
    records = record_budgets(trainer)
    trainer.train()
    assert [budget for _, budget in training_budgets(records)] == [sampler(step) for step in range(5)]
    expected = Counter(k for step in range(5) for k in sampler(step))
    assert budget_counts(trainer.state.log_history) == dict(sorted(expected.items()))  # 10 layer-steps


def test_per_layer_draws_are_refused_where_they_cannot_apply(tmp_path):
    from modeling_essm.trainer import SandwichRule

    with pytest.raises(ValueError, match="sandwich rule trains whole-model budgets"):
        SandwichRule(BudgetSampler(num_filters=8, per_layer=True, num_layers=2))
    sampler = BudgetSampler(num_filters=NUM_FILTERS, per_layer=True, num_layers=3)
    with pytest.raises(ValueError, match="draws for num_layers=3 layers but the model has num_hidden_layers=2"):
        tiny_trainer(tmp_path, sampler=sampler, max_steps=1).train()
