"""Task data modules on tiny generated data and tiny fake archives (no shared data needed)."""

import pytest

from modeling_essm.tasks import TASK_NAMES, TaskData, load_task
from modeling_essm.tasks import listops


# ---------------------------------------------------------------- ListOps


@pytest.mark.parametrize(
    "expression, value",
    [
        ("7", 7),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 5 [MAX 1 8 ] 3 ]", 3),
        ("[MED 5 1 3 ]", 3),
        ("[MED 1 2 3 4 ]", 2),  # even count: mean of 2 and 3, truncated
        ("[MED 3 9 ]", 6),
        ("[MED 0 9 8 1 ]", 4),  # middle values 1 and 8 -> 4.5 -> 4
        ("[SM 7 8 9 ]", 4),  # 24 mod 10
        ("[SM [MAX 1 2 ] [MED 0 9 ] [SM 9 9 ] ]", 4),  # 2 + 4 + 8 = 14
    ],
)
def test_listops_evaluates_hand_written_expressions(expression, value):
    assert listops.evaluate(listops.encode(expression)) == value


@pytest.mark.parametrize("expression", ["[MAX 1 2", "1 2", "[MIN ]", "]", ""])
def test_listops_rejects_malformed_expressions(expression):
    with pytest.raises(ValueError):
        listops.evaluate(listops.encode(expression))


def test_listops_vocabulary():
    assert listops.PAD_ID == 0
    assert listops.encode("0 1 2 3 4 5 6 7 8 9 [MIN [MAX [MED [SM ]") == list(range(1, 16))
    assert listops.decode(listops.encode("[SM 1 [MED 2 3 ] ]") + [0, 0]) == "[SM 1 [MED 2 3 ] ]"


def small_listops(seed=0, train_size=40, eval_size=15):
    return load_task("listops", max_length=80, min_length=30, train_size=train_size, eval_size=eval_size, seed=seed)


def test_listops_splits_follow_the_rules():
    task = small_listops()
    assert isinstance(task, TaskData)
    assert (task.name, task.num_labels, task.vocab_size, task.input_size) == ("listops", 10, 16, None)
    assert (task.pad_token_id, task.max_length, task.metric) == (0, 80, "accuracy")
    assert (len(task.train), len(task.eval)) == (40, 15)
    seen = set()
    for row in [*task.train, *task.eval]:
        ids = row["input_ids"]
        assert 30 <= len(ids) <= 80
        assert all(1 <= i < 16 for i in ids)
        assert listops.evaluate(ids) == row["labels"]
        assert ids[-1] == listops.CLOSE_ID
        seen.add(tuple(ids))
    assert len(seen) == 55  # de-duplicated within and across splits


def test_listops_respects_the_depth_limit():
    for row in small_listops(seed=5).train:
        depth = deepest = 0
        for i in row["input_ids"]:
            depth += 1 if 11 <= i <= 14 else -1 if i == listops.CLOSE_ID else 0
            deepest = max(deepest, depth)
        assert deepest < listops.MAX_DEPTH  # operators live at depths 1..9, leaves below


def test_listops_is_deterministic_for_a_seed():
    a, b, c = small_listops(seed=3), small_listops(seed=3), small_listops(seed=4)
    assert a.train["input_ids"] == b.train["input_ids"] and a.eval["labels"] == b.eval["labels"]
    assert a.train["input_ids"] != c.train["input_ids"]
    # eval is drawn first, so it does not depend on train_size
    assert small_listops(seed=3, train_size=5).eval["input_ids"] == a.eval["input_ids"]


def test_listops_ignores_data_dir(tmp_path):
    task = load_task("listops", data_dir=tmp_path / "absent", max_length=60, min_length=20, train_size=3, eval_size=2)
    assert len(task.train) == 3


@pytest.mark.parametrize("kwargs", [{"max_length": 10}, {"max_length": 100_000}, {"min_length": 90}, {"min_length": 0}])
def test_listops_rejects_bad_windows(kwargs):
    with pytest.raises(ValueError):
        load_task("listops", **{"max_length": 80, "train_size": 2, "eval_size": 2, **kwargs})


# ---------------------------------------------------------------- arguments shared by all tasks


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        load_task("pathfinder")
    assert all(name in str(error.value) for name in TASK_NAMES)


@pytest.mark.parametrize("kwargs", [{"train_size": 0}, {"eval_size": -3}, {"train_size": True}, {"train_size": 2.5}, {"seed": -1}])
def test_bad_sizes_and_seeds_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        load_task("listops", **kwargs)
