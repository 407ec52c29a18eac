"""scripts/bench_training_speed.py: the systems' turns, and the per-round ratios of its summary."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_training_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_turn_starts_one_system_later(bench):
    systems = ["a", "b", "c"]
    assert [bench.rotated(systems, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                             ["a", "b", "c"]]


def test_systems_in_fresh_processes_take_turns_step_by_step(tmp_path, monkeypatch):
    """No two steps overlap, and every step of each system lies between the others' in the rotated order."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the spawned processes import the script by its name
    bench = importlib.import_module("bench_training_speed")
    systems = ["ES-SSM, recomputed", "Llama (SDPA)"]
    runs = bench.interleaved_runs(systems, 32, 1, 2, str(tmp_path))
    assert [run["system"] for run in runs] == systems
    steps = sorted((start, end, run["system"]) for run in runs for start, end in run["step_intervals"])
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(steps, steps[1:]))
    # Turns 0, 1, 2 (the warm-up and two timed steps) in the orders a b, b a, a b.
    assert [system for _, _, system in steps] == [systems[i] for i in (0, 1, 1, 0, 0, 1)]
    for run in runs:
        assert run["seconds_per_step"] == pytest.approx(statistics.median(end - start for start, end in
                                                                          run["step_intervals"][1:]))


def test_a_system_that_fails_ends_the_round_and_the_others_processes(tmp_path, monkeypatch):
    """ES-SSM cannot be built for 16 tokens (fewer than its 32 filters): the round stops with an error instead of
    leaving Llama's process waiting for its turn."""
    import multiprocessing

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    bench = importlib.import_module("bench_training_speed")
    with pytest.raises(RuntimeError, match="ended without its result \\(L=16\\)"):
        bench.interleaved_runs(["ES-SSM, recomputed", "Llama (SDPA)"], 16, 1, 1, str(tmp_path))
    assert not multiprocessing.active_children()


def steps(*seconds):
    """Step intervals (start, end) of these durations, one after the other from time 0."""
    starts = [sum(seconds[:index]) for index in range(len(seconds))]
    return [(start, start + duration) for start, duration in zip(starts, seconds)]


def test_ratios_are_taken_within_a_round_before_the_median(bench):
    # Paired by round the model runs at 1.2x, 0.5x and 1.2x the reference: median 1.2x, where dividing the two
    # systems' medians (150 and 150 tokens/s) would give 1.0x.
    def run(system, round_index, rate):
        return {"system": system, "seq_len": 64, "round": round_index, "parameters": 7, "tokens_per_s": rate,
                "seconds_per_step": 64 / rate, "peak_resident_growth_mb": rate / 10,
                "step_intervals": steps(64 / rate, 64 / rate)}

    runs = [run("ref", 0, 100), run("model", 0, 120), run("ref", 1, 300), run("model", 1, 150), run("ref", 2, 150),
            run("model", 2, 180)]
    rows = {row["system"]: row for row in bench.summarize(runs, ["ref", "model"])}
    assert rows["model"]["ratios"]["ref"]["median"] == pytest.approx(1.2)
    assert rows["model"]["ratios"]["ref"]["range"] == pytest.approx([0.5, 1.2])
    assert rows["ref"]["ratios"]["model"]["median"] == pytest.approx(1 / 1.2)
    assert rows["model"]["tokens_per_s"] == 150 and rows["model"]["rounds"] == 3
    assert rows["model"]["peak_resident_growth_mb"] == pytest.approx(15)
    assert "model" not in rows["model"]["ratios"]  # not against itself
    # One timed step per run, as fast as its round's rate: speed-ups 1.2, 0.5, 1.2.
    assert rows["model"]["ratios"]["ref"]["steps"] == {"median": pytest.approx(1.2), "at_least_1": 2, "pairs": 3}


def test_step_speedups_pair_the_timed_steps_of_a_turn(bench):
    # Warm-ups of 5 s and 9 s are left out; then the reference's 2 s and 3 s against the run's 1 s and 4 s.
    run, reference = {"step_intervals": steps(5, 1, 4)}, {"step_intervals": steps(9, 2, 3)}
    assert bench.step_speedups(run, reference) == pytest.approx([2.0, 0.75])


@pytest.mark.parametrize("flags, message", [(["--rounds", "0"], "at least 1"), (["--batch-size", "0"], "at least 1"),
                                            (["--output", "/no/such/folder/speed.json"], "does not exist"),
                                            (["--systems", "Llama (SDPA)", "Llama (SDPA)"], "twice")])
def test_bad_arguments_stop_before_any_run(bench, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(bench, "interleaved_runs", lambda *args: pytest.fail("a system ran"))
    monkeypatch.setattr("sys.argv", ["bench_training_speed.py", *flags])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_report_is_replaced_whole_after_every_run(bench, tmp_path):
    report = tmp_path / "speed.json"
    report.write_text("an earlier report")
    runs = [{"system": "ref", "seq_len": 64, "round": 0, "parameters": 7, "tokens_per_s": 100.0,
             "seconds_per_step": 0.64, "peak_resident_growth_mb": 10.0}]
    bench.write_report(str(report), {"references": ["ref"]}, runs)
    written = json.loads(report.read_text())
    assert written["runs"] == runs and written["rows"][0]["tokens_per_s"] == 100.0
    assert [path.name for path in tmp_path.iterdir()] == ["speed.json"]  # the aside copy was renamed into place


def test_a_step_trains_and_counts_every_sequence_of_its_batch(bench, tmp_path, monkeypatch):
    from transformers import Trainer

    shapes, training_step = [], Trainer.training_step

    def recorded_step(self, model, inputs, *args, **kwargs):
        shapes.append(tuple(inputs["input_ids"].shape))
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recorded_step)
    run = bench.median_step_seconds("ES-SSM, recomputed", 32, 3, 1, str(tmp_path))
    assert shapes == [(3, 32)] * 2  # the warm-up and the timed step
    assert run["batch_size"] == 3
    assert run["tokens_per_s"] == pytest.approx(3 * 32 / run["seconds_per_step"])
