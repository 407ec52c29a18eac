from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling_essm.baselines import (
    PARAMETER_TOLERANCE,
    RealValuedInputs,
    build_baseline,
    count_parameters,
    match_size,
    matched_baseline,
)
from modeling_essm.tasks import BYTE_PAD_ID, BYTE_VOCAB_SIZE, TaskData, listops
from modeling_essm.training import build_model_config, load_run_config, model_class_for


BENCH_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "bench"
# What each task's loader reports about its data, without reading any data.
TASK_SHAPES = {
    "listops": dict(num_labels=10, vocab_size=len(listops.VOCAB), input_size=None, pad_token_id=listops.PAD_ID),
    "text": dict(num_labels=2, vocab_size=BYTE_VOCAB_SIZE, input_size=None, pad_token_id=BYTE_PAD_ID),
    "image": dict(num_labels=10, vocab_size=256, input_size=None, pad_token_id=None),
    "audio": dict(num_labels=10, vocab_size=None, input_size=1, pad_token_id=None),
    "lm": dict(num_labels=None, vocab_size=BYTE_VOCAB_SIZE, input_size=None, pad_token_id=BYTE_PAD_ID),
}


def task_like(name, max_length=32, **changes):
    metric = "bits_per_byte" if name == "lm" else "accuracy"
    fields = dict(name=name, train=None, eval=None, max_length=max_length, metric=metric, **TASK_SHAPES[name])
    return TaskData(**{**fields, **changes})


@pytest.mark.parametrize("baseline", ["llama", "mamba"])
@pytest.mark.parametrize("task_name", list(TASK_SHAPES))
def test_bench_config_baselines_match_the_essm_parameter_count(task_name, baseline):
    run_config = load_run_config(BENCH_CONFIGS / f"{task_name}.yaml")
    assert run_config["task"]["name"] == task_name
    task = task_like(task_name, max_length=run_config["task"]["max_length"])
    essm_config = build_model_config(run_config["model"], task)
    target = count_parameters(model_class_for(task)(essm_config))
    model = matched_baseline(baseline, essm_config, task)
    assert abs(count_parameters(model) / target - 1) <= PARAMETER_TOLERANCE
    assert model.config.num_hidden_layers == essm_config.num_hidden_layers  # same depth when a width fits


def test_size_search_reports_an_impossible_target():
    with pytest.raises(ValueError, match="no llama with 1 to 8 layers comes within 10% of 10 parameters"):
        match_size("llama", task_like("listops"), target=10, depth=2)


def test_unknown_baseline_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown baseline 'gpt'; valid baselines: llama, mamba"):
        build_baseline("gpt", task_like("listops"), 16, 1)


def test_llama_uses_sdpa_and_the_language_model_ties_its_embeddings():
    classifier = build_baseline("llama", task_like("listops"), 16, 1)
    language_model = build_baseline("llama", task_like("lm"), 16, 1)
    assert classifier.config._attn_implementation == language_model.config._attn_implementation == "sdpa"
    assert language_model.lm_head.weight is language_model.model.embed_tokens.weight


def padded_logits(model, tokens, pad_id, total_length, side):
    """Logits of `tokens` alone and as the first row of a padded batch (a full-length second row)."""
    padding = [pad_id] * (total_length - len(tokens))
    row, mask = (tokens + padding, [1] * len(tokens) + [0] * len(padding))
    if side == "left":
        row, mask = (padding + tokens, mask[::-1])
    other = list(range(1, total_length + 1))
    batch = {"input_ids": torch.tensor([row, other]), "attention_mask": torch.tensor([mask, [1] * total_length])}
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0], model(**batch).logits[0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("baseline", ["llama", "mamba"])
def test_classifiers_pool_the_same_sequence_alike_whatever_the_padding(baseline, side):
    torch.manual_seed(0)
    model = build_baseline(baseline, task_like("listops"), 16, 2).eval()
    alone, padded = padded_logits(model, [11, 3, 5, 15, 7], listops.PAD_ID, total_length=9, side=side)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("baseline", ["llama", "mamba"])
def test_classifiers_mean_pool_real_positions_and_return_cross_entropy(baseline):
    torch.manual_seed(0)
    model = build_baseline(baseline, task_like("listops"), 16, 1).eval()
    input_ids = torch.tensor([[11, 3, 5, 0, 0], [12, 4, 6, 8, 15]])
    attention_mask = (input_ids != 0).long()
    labels = torch.tensor([2, 7])
    backbone = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    expected = model.score(torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)]))
    assert output.logits.shape == (2, 10)
    torch.testing.assert_close(output.logits, expected)
    torch.testing.assert_close(output.loss, F.cross_entropy(expected, labels))
    assert model.accepts_loss_kwargs is False


def test_llama_classifier_without_task_padding_reads_every_position():
    # Image pixels have no pad id; 0 is a real pixel, so trailing zeros are pooled like any other.
    torch.manual_seed(0)
    model = build_baseline("llama", task_like("image"), 16, 1).eval()
    assert model.config.pad_token_id is None and model.config.vocab_size == 256
    input_ids = torch.tensor([[9, 200, 0, 0], [1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        hidden = model.model(input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(logits, model.score(hidden.mean(1)))


@pytest.mark.parametrize("baseline", ["llama", "mamba"])
def test_language_models_score_next_bytes_and_ignore_padding_labels(baseline):
    torch.manual_seed(0)
    model = build_baseline(baseline, task_like("lm"), 16, 1)
    input_ids = torch.tensor([[72, 101, 108, 108, 111], [72, 105, BYTE_PAD_ID, BYTE_PAD_ID, BYTE_PAD_ID]])
    attention_mask = (input_ids != BYTE_PAD_ID).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert output.logits.shape == (2, 5, BYTE_VOCAB_SIZE)
    expected = F.cross_entropy(output.logits[:, :-1].reshape(-1, BYTE_VOCAB_SIZE), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(output.loss, expected)


@pytest.mark.parametrize("baseline", ["llama", "mamba"])
def test_real_valued_inputs_reach_the_baseline_through_a_linear_projection(baseline):
    torch.manual_seed(0)
    model = build_baseline(baseline, task_like("audio"), 16, 1)
    assert isinstance(model, RealValuedInputs)
    waveforms, labels = torch.randn(2, 12), torch.tensor([3, 8])
    output = model(input_values=waveforms, attention_mask=torch.ones(2, 12, dtype=torch.long), labels=labels)
    assert output.logits.shape == (2, 10)
    output.loss.backward()
    assert model.input_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        direct = model.model(inputs_embeds=model.input_proj(waveforms.unsqueeze(-1))).logits
    torch.testing.assert_close(output.logits.detach(), direct)
