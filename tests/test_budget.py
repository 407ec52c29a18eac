import math
from collections import Counter

import pytest

from modeling_essm.budget import BudgetSampler, default_budget_grid


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
