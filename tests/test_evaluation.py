import json
import math

import pytest
import torch
from datasets import Dataset
from tiny_trainer import tiny_dataset, tiny_model

from modeling_essm import ESSSMConfig, ESSSMForCausalLM
from modeling_essm.evaluation import eval_budgets, markdown_table, sweep_budgets, write_report
from modeling_essm.training import PaddingCollator


def test_sweep_matches_calling_the_model_at_each_budget():
    model = tiny_model().eval()
    dataset = tiny_dataset(12, seed=3)
    collator = PaddingCollator(pad_token_id=0)
    rows = sweep_budgets(model, dataset, collator, budgets=[2, 5, 8], batch_size=5)
    batch = collator(list(dataset))
    for row in rows:
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, spectral_budget=row["budget"]).logits
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
        assert row["accuracy"] == pytest.approx(accuracy)
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["parameters"] == model.slice_to_budget(row["budget"]).num_parameters()
        assert row["tokens_per_second"] > 0
    assert rows[0]["parameters"] < rows[1]["parameters"] < rows[2]["parameters"] == model.num_parameters()


def test_causal_lm_sweep_reports_bits_per_byte():
    torch.manual_seed(0)
    config = ESSSMConfig(vocab_size=259, hidden_size=16, num_hidden_layers=1, num_spectral_filters=4,
                         max_position_embeddings=32, intermediate_size=0)
    model = ESSSMForCausalLM(config).eval()
    sequences = [[(7 * i + j) % 256 for j in range(20)] for i in range(3)]
    dataset = Dataset.from_dict({"input_ids": sequences, "labels": sequences})
    collator = PaddingCollator(pad_token_id=256, causal_lm=True)
    [row] = sweep_budgets(model, dataset, collator, budgets=[3], batch_size=3, causal_lm=True)
    with torch.no_grad():
        expected = model(**collator(list(dataset)), spectral_budget=3).loss.item()
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    assert row["bits_per_byte"] == pytest.approx(expected / math.log(2), rel=1e-5)


def test_report_is_written_as_json_markdown_and_png(tmp_path):
    rows = [
        {"budget": 2, "accuracy": 0.5, "loss": 1.2, "tokens_per_second": 900.0, "parameters": 1000},
        {"budget": 4, "accuracy": 0.75, "loss": 0.8, "tokens_per_second": 700.0, "parameters": 1500},
    ]
    settings = {"model_dir": "run", "task": "listops", "eval_samples": 8, "command": "essm-eval-budgets run"}
    paths = write_report(rows, tmp_path, settings)
    assert json.loads(paths["json"].read_text()) == {"settings": settings, "results": rows}
    assert "| 4 | 0.7500 | 0.8000 | 1,500 | 700 |" in paths["md"].read_text()
    assert "Reproduce: `essm-eval-budgets run`" in paths["md"].read_text()
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert markdown_table(rows).splitlines()[0] == "| budget k | accuracy | loss | parameters | tokens/s |"


def test_sweep_needs_a_training_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no run_config.yaml"):
        eval_budgets(tmp_path)
