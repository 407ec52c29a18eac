"""The model's default budget (`config.spectral_budget`): what every call that passes no budget runs at."""

import pytest
import torch
from conftest import tiny_config
from test_modeling_essm import load_in_clean_process
from tiny_trainer import tiny_model, tiny_trainer
from transformers import AutoConfig, AutoModelForCausalLM, pipeline

from modeling_essm import ESSSMForCausalLM, ESSSMForSequenceClassification, ESSSMTokenizer
from modeling_essm.budget import BudgetSampler

K = 16  # num_spectral_filters of tiny_config


def tokens(batch=2, seq_len=24, seed=0):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def mixer_budgets(model):
    """The budget every forward of the first mixer runs at, as it runs (the budget the call resolved to)."""
    budgets = []
    backbone = getattr(model, "model", model)
    handle = backbone.layers[0].mixer.register_forward_pre_hook(lambda module, args: budgets.append(args[2]))
    return budgets, handle


def test_calls_without_a_budget_run_at_the_default_and_a_call_budget_wins():
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(spectral_budget=4)).eval()
    x = tokens()
    with torch.no_grad():
        default, at_4, at_8 = model(x).logits, model(x, spectral_budget=4).logits, model(x, spectral_budget=8).logits
    assert torch.equal(default, at_4) and (at_8 - at_4).abs().max() > 1e-4
    generated = model.generate(x[:, :5], max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, model.generate(x[:, :5], max_new_tokens=6, do_sample=False, eos_token_id=None,
                                                 spectral_budget=4))


def test_the_default_is_set_at_load_time_saved_and_reloaded(tmp_path):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path / "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", spectral_budget=4).eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x, spectral_budget=4).logits)
    loaded.save_pretrained(tmp_path / "at4")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "at4").config.spectral_budget == 4
    assert AutoConfig.for_model("essm", spectral_budget=4).spectral_budget == 4


@pytest.mark.parametrize("bad", [1, K + 1, 2.5, "4", True, [4], [4, K + 1], [4, 1.5]])
def test_bad_defaults_name_the_valid_range_in_the_config_and_at_load_time(bad, tmp_path):
    message = (rf"spectral_budget \(the model's default budget, None for the full budget\) must be an integer in "
               rf"\[2, {K}\] .* or a list of 2 integers, one per layer")
    with pytest.raises(ValueError, match=message):
        tiny_config(spectral_budget=bad)
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(tmp_path, spectral_budget=bad)


def test_a_default_set_on_a_loaded_model_is_checked_when_used():
    model = ESSSMForCausalLM(tiny_config()).eval()
    model.config.spectral_budget = 40
    with pytest.raises(ValueError, match=rf"config.spectral_budget \(the model's default budget\) must be .*\[2, {K}\]"):
        model(tokens())


def test_a_slice_keeps_the_default_only_when_it_is_within_the_slice():
    model = ESSSMForCausalLM(tiny_config(spectral_budget=8))
    assert model.slice_to_budget(4).config.spectral_budget is None  # the slice's own full budget
    assert model.slice_to_budget(12).config.spectral_budget == 8


def test_both_pipelines_run_at_the_default():
    torch.manual_seed(0)
    tokenizer = ESSSMTokenizer()
    lm = ESSSMForCausalLM(tiny_config(spectral_budget=4)).eval()
    budgets, handle = mixer_budgets(lm)
    try:
        text = pipeline("text-generation", model=lm, tokenizer=tokenizer)(
            "To be", max_new_tokens=5, do_sample=False, eos_token_id=None)[0]["generated_text"]
    finally:
        handle.remove()
    assert set(budgets) == {4}
    ids = tokenizer("To be", return_tensors="pt").input_ids
    expected = lm.generate(ids, max_new_tokens=5, spectral_budget=4, do_sample=False, eos_token_id=None)[0]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)

    torch.manual_seed(0)
    classifier = ESSSMForSequenceClassification(tiny_config(spectral_budget=4, num_labels=3)).eval()
    budgets, handle = mixer_budgets(classifier)
    try:
        scores = pipeline("text-classification", model=classifier, tokenizer=tokenizer, top_k=None)(["To be, or not"])[0]
    finally:
        handle.remove()
    assert budgets == [4]
    with torch.no_grad():
        probabilities = classifier(**tokenizer("To be, or not", return_tensors="pt"), spectral_budget=4).logits.softmax(-1)
    by_label = {row["label"]: row["score"] for row in scores}
    assert [by_label[classifier.config.id2label[i]] for i in range(3)] == pytest.approx(probabilities[0].tolist())


def test_trainer_evaluates_at_the_default_while_training_draws_still_win(tmp_path):
    model = tiny_model()
    model.config.spectral_budget = 2
    trainer = tiny_trainer(tmp_path, model=model, sampler=BudgetSampler("fixed", num_filters=8, fixed_budget=8))
    budgets, handle = mixer_budgets(model)
    trainer.train()
    trained = len(budgets)
    trainer.evaluate()
    handle.remove()
    assert set(budgets[:trained]) == {8} and set(budgets[trained:]) == {2}


def test_remote_code_runs_at_the_saved_default_in_a_clean_process(tmp_path):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(spectral_budget=4)).eval()
    model.save_pretrained(tmp_path / "saved")
    x = tokens()
    remote = load_in_clean_process(tmp_path / "saved", "AutoModelForCausalLM", [None], x, tmp_path)
    with torch.no_grad():
        assert torch.equal(remote[None], model(x, spectral_budget=4).logits)
