import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fake_archives import fsdd_archive, wav_bytes
from modeling_essm import compare, cpu_allocator
from modeling_essm.compare import MODELS, model_run_config, parse_models


ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_results = load_script("build_results")


def write_tiny_config(tmp_path):
    config = {
        "task": {"name": "listops", "max_length": 40, "min_length": 20, "train_size": 16, "eval_size": 8, "seed": 0},
        "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_spectral_filters": 8, "intermediate_size": 16,
                  "bos_token_id": None, "eos_token_id": None},
        "budget": {"schedule": "paper", "seed": 0},
        "training": {"output_dir": str(tmp_path / "runs"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 8, "use_cpu": True, "report_to": "none", "save_strategy": "no",
                     "disable_tqdm": True, "seed": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fixed_variant_trains_only_at_full_budget_in_its_own_directory(tmp_path):
    run_config = {"task": {"name": "listops"}, "model": {"num_spectral_filters": 16}, "budget": {"schedule": "paper"},
                  "training": {"output_dir": "outputs/bench/listops"}, "recipe": {"sandwich": True, "ema_decay": 0.99}}
    fixed = model_run_config(run_config, "essm-fixed")
    assert fixed["budget"] == {"schedule": "fixed", "fixed_budget": 16}
    assert fixed["recipe"] == {"sandwich": False, "ema_decay": 0.99}  # one budget: no sandwich, the rest shared
    assert model_run_config(run_config, "essm")["recipe"]["sandwich"] is True
    assert fixed["training"]["output_dir"] == str(Path("outputs/bench/listops/essm-fixed"))
    assert model_run_config(run_config, "essm")["budget"] == {"schedule": "paper"}
    assert run_config["training"]["output_dir"] == "outputs/bench/listops"  # the shared config is left alone


def test_comparison_writes_one_well_formed_json_per_model(tmp_path, monkeypatch):
    config = write_tiny_config(tmp_path)
    results_dir = tmp_path / "results"
    monkeypatch.setenv("ESSM_REUSE_FREED_MEMORY", "1")  # recorded as switched on (a stand-in switch: no leak)
    monkeypatch.setattr(cpu_allocator, "reuse_freed_memory", lambda: True)
    compare.main([str(config), "--models", "essm-fixed,llama", "--results-dir", str(results_dir)])

    fixed = json.loads((results_dir / "listops" / "essm-fixed.json").read_text())
    llama = json.loads((results_dir / "listops" / "llama.json").read_text())
    assert sorted(path.name for path in (results_dir / "listops").iterdir()) == ["essm-fixed.json", "llama.json"]
    for result in (fixed, llama):
        assert result["task"] == "listops" and result["metric"] == "accuracy"
        assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0 and result["tokens_per_second"] > 0
        assert result["train_steps"] == 2 and result["train_seconds"] > 0
        assert result["settings"]["eval_samples"] == 8
        assert result["settings"]["command"].startswith("essm-compare ")
        assert result["settings"]["reuses_freed_memory"] is True
    sweep = json.loads((tmp_path / "runs" / "essm-fixed" / "budget_sweep.json").read_text())
    assert sweep["settings"]["reuses_freed_memory"] is True
    assert [row["budget"] for row in fixed["budgets"]] == [2, 3, 4, 6, 8]
    assert fixed["budgets"][-1]["parameters"] == fixed["parameters"]
    assert fixed["accuracy"] == fixed["budgets"][-1]["accuracy"]
    assert fixed["settings"]["run_config"]["budget"] == {"schedule": "fixed", "fixed_budget": 8}
    assert llama["budgets"] is None and llama["model_class"] == "LlamaForSequenceClassification"
    assert abs(llama["parameters"] / fixed["parameters"] - 1) <= 0.10
    # The ablation really trained at K only.
    state = json.loads((tmp_path / "runs" / "essm-fixed" / "trainer_state.json").read_text())
    counts = {key: value for entry in state["log_history"] for key, value in entry.items() if key.startswith("budget_count_")}
    assert counts == {"budget_count_8": 2}


def test_baselines_on_real_valued_inputs_are_compared_like_the_others(tmp_path):
    rng = np.random.default_rng(0)
    recordings = {f"{digit}_alice_{take}.wav": wav_bytes(rng.integers(-3000, 3000, 64))
                  for digit in range(10) for take in (4, 5)}  # take 4: the test split
    data_dir = fsdd_archive(tmp_path, recordings)
    config = yaml.safe_load(write_tiny_config(tmp_path).read_text())
    config["task"] = {"name": "audio", "data_dir": str(data_dir), "max_length": 64, "frame_size": 8, "seed": 0}
    config["model"]["classifier_pooling"] = "mean"
    path = tmp_path / "audio.yaml"
    path.write_text(yaml.safe_dump(config))

    compare.main([str(path), "--models", "llama,mamba", "--results-dir", str(tmp_path / "results")])

    for model in ("llama", "mamba"):
        result = json.loads((tmp_path / "results" / "audio" / f"{model}.json").read_text())
        assert result["metric"] == "accuracy" and 0.0 <= result["accuracy"] <= 1.0
        assert result["model_config"]["model_type"] == model and result["train_steps"] == 2
        assert result["settings"]["reuses_freed_memory"] is False  # not asked for


@pytest.fixture
def no_training(monkeypatch):
    def training_started(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(compare, "train", training_started)


def test_unknown_model_lists_the_valid_ones_before_training(tmp_path, no_training, capsys):
    with pytest.raises(SystemExit):
        compare.main([str(write_tiny_config(tmp_path)), "--models", "essm,gpt2"])
    assert "unknown models ['gpt2']; valid models: essm, essm-fixed, llama, mamba" in capsys.readouterr().err
    with pytest.raises(ValueError, match="valid models: essm, essm-fixed, llama, mamba"):
        parse_models(" , ")


def test_a_bad_allocator_request_fails_before_training(tmp_path, no_training, monkeypatch, capsys):
    monkeypatch.setenv("ESSM_REUSE_FREED_MEMORY", "on")
    with pytest.raises(SystemExit) as exit_status:
        compare.main([str(write_tiny_config(tmp_path)), "--models", "essm", "--results-dir", str(tmp_path / "results")])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == ("essm-compare: error: ESSM_REUSE_FREED_MEMORY must be 1 (keep freed memory for "
                                       "reuse) or 0 (glibc's defaults, also when unset), got 'on'.\n")
    assert not (tmp_path / "results").exists()


def test_missing_config_fails_before_training(tmp_path, no_training):
    with pytest.raises(FileNotFoundError, match="run config not found"):
        compare.compare(tmp_path / "missing.yaml", ["essm"])


def fake_result(task, model, metric_value, budgets=None):
    return {
        "task": task, "model": model, "metric": "accuracy", "accuracy": metric_value, "loss": 1.0,
        "tokens_per_second": 1234.0, "parameters": 300_000, "train_seconds": 600.0, "train_steps": 400,
        "seconds_per_step": 1.5, "train_loss": 1.75,
        "model_class": "X", "model_config": {"num_hidden_layers": 2, "hidden_size": 64},
        "budgets": None if budgets is None else [
            {"budget": k, "accuracy": value, "loss": 1.0, "tokens_per_second": 1.0, "parameters": 1000 * k}
            for k, value in budgets.items()
        ],
        "settings": {"eval_samples": 500, "num_threads": 2, "run_config": {
            "task": {"name": task, "max_length": 500, "min_length": 100, "train_size": 20000},
            "model": {}, "budget": {}, "training": {"output_dir": f"x/{model}", "max_steps": 400,
                                                    "per_device_train_batch_size": 32, "learning_rate": 0.003}}},
    }


def test_results_page_has_a_table_per_run_task_and_marks_the_rest_not_yet_run(tmp_path):
    results_dir, docs_dir = tmp_path / "results", tmp_path / "docs"
    (results_dir / "listops").mkdir(parents=True)
    results = {
        "essm": fake_result("listops", "essm", 0.40, {2: 0.30, 4: 0.39, 32: 0.40}),
        "essm-fixed": fake_result("listops", "essm-fixed", 0.41, {2: 0.10, 4: 0.12, 32: 0.41}),
        "llama": fake_result("listops", "llama", 0.37),
    }
    for model, result in results.items():
        (results_dir / "listops" / f"{model}.json").write_text(json.dumps(result))
    (results_dir / "listops" / "NOTES.md").write_text("Observed: the curves are flat.\n")

    page = build_results.build(results_dir, docs_dir).read_text()

    assert "small-scale CPU runs" in page
    assert "| model | parameters | layers x width | accuracy | final train loss | eval tokens/s |" in page
    assert "| llama | 300,000 | 2 x 64 | 37.0% | 1.750 | 1,234 | 10.0 min | 1.50 | 400 |" in page
    assert "| mamba | not yet run |" in page
    assert "| ListOps | accuracy | 40.0% | 39.0% | 41.0% | 12.0% | 37.0% | not yet run |" in page  # at a glance
    assert "| Text | accuracy | " + " | ".join(["not yet run"] * 6) + " |" in page
    assert "| 4 | 4,000 | 39.0% | 12.0% |" in page  # both budget curves at every budget
    assert ("Sequence length 100-500, 20000 training / 500 evaluation examples, 400 steps of batch 32, "
            "learning rate 0.003, 2 torch thread(s)." in page)
    assert "ES-SSM at full budget (40.0%) at least matches the Transformer (37.0%): met" in page
    assert "ES-SSM at k=4 is 27.0 points above the ablation at k=4 (target at least 10): met" in page
    assert "ES-SSM at k=4 keeps 97.5% of its full-budget accuracy (target 95%): met" in page
    assert "ES-SSM at k=2 keeps 75.0% of its full-budget accuracy (target 85%): missed" in page
    for task in ("text", "image", "audio", "lm"):
        assert f"Not yet run. Run `OMP_NUM_THREADS=1 essm-compare configs/bench/{task}.yaml`" in page
    assert (docs_dir / "results_listops.png").read_bytes().startswith(b"\x89PNG")
    assert "![listops budget curves](results_listops.png)" in page
    assert "Observed: the curves are flat." in page
    assert set(MODELS) <= set(build_results.DESCRIPTIONS)
    assert "Reproduce: `OMP_NUM_THREADS=1 essm-compare configs/bench/listops.yaml`" in page


def test_reproduce_commands_ask_for_glibc_reuse_only_where_every_run_had_it():
    had_it = {model: {"settings": {"reuses_freed_memory": True}} for model in ("essm", "llama")}
    assert build_results.compare_command("lm", had_it) == (
        "ESSM_REUSE_FREED_MEMORY=1 OMP_NUM_THREADS=1 essm-compare configs/bench/lm.yaml")
    had_it["llama"]["settings"]["reuses_freed_memory"] = False
    assert build_results.compare_command("lm", had_it) == "OMP_NUM_THREADS=1 essm-compare configs/bench/lm.yaml"
    assert build_results.compare_command("lm", {}) == "OMP_NUM_THREADS=1 essm-compare configs/bench/lm.yaml"


def test_results_page_shows_second_seeds_beside_the_first_with_their_mean(tmp_path):
    results_dir, docs_dir = tmp_path / "results", tmp_path / "docs"
    runs = {
        ".": {"essm": fake_result("audio", "essm", 0.40, {2: 0.30, 4: 0.36, 11: 0.40}),
              "llama": fake_result("audio", "llama", 0.60)},
        "seeds/seed1": {"essm": fake_result("audio", "essm", 0.50, {2: 0.20, 4: 0.44, 11: 0.50}),
                        "llama": fake_result("audio", "llama", 0.64)},
        "recipes/bias2": {"essm": fake_result("audio", "essm", 0.42, {2: 0.40, 4: 0.41, 11: 0.42})},
    }
    for seed_dir, models in runs.items():
        (results_dir / seed_dir / "audio").mkdir(parents=True, exist_ok=True)
        for model, result in models.items():
            (results_dir / seed_dir / "audio" / f"{model}.json").write_text(json.dumps(result))

    page = build_results.build(results_dir, docs_dir).read_text()

    assert "| run | seed | k=2 | k=4 | K |" in page
    assert "| essm, paper schedule | 0 | 30.0% | 36.0% | 40.0% |" in page
    assert "| essm, paper schedule | 1 | 20.0% | 44.0% | 50.0% |" in page
    assert "| essm, paper schedule | mean | 25.0% | 40.0% | 45.0% |" in page
    assert "| essm, `budget.bias: 2` | 0 | 40.0% | 41.0% | 42.0% |" in page
    assert "| essm, `budget.bias: 2` | mean |" not in page  # one seed: no mean
    assert "| llama | mean |  |  | 62.0% |" in page
    assert build_results.seed_table(results_dir, "listops") is None


def test_settings_line_names_the_es_ssm_projection_multiplier():
    result = fake_result("listops", "essm", 0.4)
    result["model_config"] = {"spectral_proj_multiplier": 100.0}
    assert build_results.settings_line(result).endswith(
        "learning rate 0.003 (the ES-SSM's spectral_proj_multiplier: 100), 2 torch thread(s).")


def test_models_of_a_task_compare_on_data_training_and_recipe_not_architecture():
    essm, llama = fake_result("listops", "essm", 0.4), fake_result("listops", "llama", 0.4)
    essm["settings"]["run_config"]["model"] = {"hidden_size": 96, "num_spectral_filters": 11}
    essm["settings"]["run_config"]["recipe"] = {"sandwich": True}
    assert build_results.comparable_settings(essm) == build_results.comparable_settings(llama)
    llama["settings"]["run_config"]["recipe"] = {"ema_decay": 0.999}
    assert build_results.comparable_settings(essm) != build_results.comparable_settings(llama)
    llama["settings"]["run_config"]["recipe"] = {}
    llama["settings"]["run_config"]["training"]["learning_rate"] = 0.001
    assert build_results.comparable_settings(essm) != build_results.comparable_settings(llama)


def test_language_model_targets_are_checked_in_bits_per_byte():
    def lm_result(value, budgets=None):
        return {"metric": "bits_per_byte", "bits_per_byte": value,
                "budgets": budgets and [{"budget": k, "bits_per_byte": v} for k, v in budgets.items()]}

    checks = build_results.target_checks({
        "essm": lm_result(2.50, {2: 2.75, 4: 2.60, 11: 2.50}),
        "essm-fixed": lm_result(2.40, {2: 4.00, 4: 3.00, 11: 2.40}),
        "llama": lm_result(2.40),
    })
    assert checks == [
        "ES-SSM at full budget is 0.100 bits per byte behind the Transformer (target at most 0.18): met",
        "ES-SSM at k=4 is 4.0% above its full-budget bits per byte (target within 5%): met",
        "ES-SSM at k=2 is 10.0% above its full-budget bits per byte (target within 12%): met",
        "ES-SSM at k=4 is 0.400 bits per byte below the ablation at k=4 (target at least 0.5): missed",
        "largest loss of the ES-SSM curve as the budget grows: 0.000 bits per byte (monotone up to noise when small)",
    ]
