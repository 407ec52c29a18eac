"""scripts/bench_speculative.py: a tiny run end to end, on a tiny saved model."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from modeling_essm import ESSSMForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_speculative.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports bench_generate by name
    spec = importlib.util.spec_from_file_location("bench_speculative", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    ESSSMForCausalLM(tiny_config(initializer_range=0.1)).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_the_benchmark_reports_every_draft_budget_against_plain_decoding(bench, folder, tmp_path,
                                                                         stand_in_shakespeare):
    out = tmp_path / "bench"
    bench.main([str(folder), "--contexts", "16", "32", "--draft-budgets", "2", "8", "--draft-tokens", "3",
                "--new-tokens", "12", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(row["context"], row["method"], row.get("num_assistant_tokens_schedule")) for row in rows] == [
        (context, method, schedule) for context in (16, 32)
        for method, schedule in [("plain", None), ("draft k=2", "constant"), ("draft k=2", "heuristic"),
                                 ("draft k=8", "constant"), ("draft k=8", "heuristic")]]
    for row in rows:
        rounds, drafts = row["verifying_forwards"], row["draft_forwards"]
        if row["method"] == "plain":
            assert (rounds, drafts, row["speedup"]) == (12, 0, 1.0)
        else:  # every round yields its accepted drafts plus one token of the full budget
            assert 1 <= rounds <= 12 and row["acceptance_rate"] == (12 - rounds) / drafts
        assert row["tokens_per_s"] > 0 and (row["agreement"] is None) == (row["method"] == "plain")
    assert "| 32 | draft k=8 | 3, adaptive | " in out.with_suffix(".md").read_text()


def test_contexts_beyond_the_filters_are_refused_before_any_run(bench, folder, tmp_path):
    with pytest.raises(ValueError, match=r"context 120 \+ 12 new tokens exceeds .* max_position_embeddings=128"):
        bench.main([str(folder), "--contexts", "120", "--new-tokens", "12", "--out", str(tmp_path / "bench")])
