import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from safetensors.torch import load_file
from tiny_trainer import NUM_FILTERS, tiny_dataset, tiny_model
from transformers import TrainerCallback, TrainingArguments

from modeling_essm import ESSSMForCausalLM
from modeling_essm.budget import BudgetSampler
from modeling_essm.trainer import (
    EMA_FILE,
    EMACallback,
    ESSSMTrainer,
    SandwichRule,
    distillation_loss,
    paper_training_arguments,
)
from modeling_essm.training import PaddingCollator


def trainer_for(tmp_path, model=None, callbacks=(), **options):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
                save_strategy="no", logging_steps=1, use_cpu=True, report_to=[], disable_tqdm=True, seed=0)
    trainer_options = {name: options.pop(name) for name in ("decay_embeddings", "sandwich", "eval_budgets")
                       if name in options}
    return ESSSMTrainer(model=model or tiny_model(), args=TrainingArguments(**{**args, **options}),
                        train_dataset=tiny_dataset(), eval_dataset=tiny_dataset(8, seed=1),
                        data_collator=PaddingCollator(pad_token_id=0), callbacks=list(callbacks), **trainer_options)


def batch(size=4):
    return PaddingCollator(pad_token_id=0)([tiny_dataset(size, seed=2)[i] for i in range(size)])


# --- optimiser groups and schedule ------------------------------------------------------------------------


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_groups(tmp_path, decay_embeddings):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config())  # tied head: the embedding table is also the output layer
    trainer = trainer_for(tmp_path, model=model, decay_embeddings=decay_embeddings, weight_decay=0.03)
    trainer.create_optimizer()
    decay_of = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    lr_of = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        matrix = name.endswith(("spectral_proj", "proj.weight", "gate_in.weight", "gate_out.weight", "fc_in.weight",
                                "fc_out.weight", "local_conv.weight"))
        embedding = name == "model.embed_tokens.weight"
        expected = 0.03 if matrix or (embedding and decay_embeddings) else 0.0
        assert decay_of[id(parameter)] == expected, name
        assert lr_of[id(parameter)] == 1e-2, name  # one learning rate: the M_j learn faster through the model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_paper_schedule_warms_up_then_decays_to_a_tenth_of_the_peak(tmp_path):
    args = paper_training_arguments(str(tmp_path), max_steps=100, use_cpu=True, report_to=[])
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (
        2e-4, 0.9, 0.95, 0.03, 1.0)
    trainer = ESSSMTrainer(model=tiny_model(), args=args, train_dataset=tiny_dataset(),
                           data_collator=PaddingCollator(pad_token_id=0))
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    rates = []
    for _ in range(100):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[0] == 0.0 and rates[6] == pytest.approx(2e-4)  # 6% warm-up
    assert max(rates) == pytest.approx(2e-4)
    assert rates[-1] == pytest.approx(2e-5, rel=0.05)  # cosine down to 10% of the peak, not to 0
    assert all(a >= b for a, b in zip(rates[6:], rates[7:]))


# --- EMA -------------------------------------------------------------------------------------------------


class WeightRecorder(TrainerCallback):
    """The trainable weights after every optimizer step, and at every evaluation."""

    def __init__(self):
        self.after_step, self.at_evaluation = [], []

    @staticmethod
    def snapshot(model):
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append(self.snapshot(model))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.at_evaluation.append(self.snapshot(model))


def expected_average(snapshots, initial, decay):
    average = {name: tensor.clone() for name, tensor in initial.items()}
    for step, weights in enumerate(snapshots, start=1):
        d = min(decay, (1 + step) / (10 + step))
        for name in average:
            average[name] = d * average[name] + (1 - d) * weights[name]
    return average


def test_ema_is_used_for_evaluation_and_kept_at_the_end(tmp_path):
    model = tiny_model()
    initial = WeightRecorder.snapshot(model)
    recorder = WeightRecorder()
    # The recorder runs before the EMA callback, so it records the raw weights at each step end.
    trainer = trainer_for(tmp_path, model=model, callbacks=[recorder, EMACallback(0.5)], max_steps=6,
                          eval_strategy="steps", eval_steps=3)
    trainer.train()
    average_at_3 = expected_average(recorder.after_step[:3], initial, 0.5)
    for name, tensor in recorder.at_evaluation[0].items():
        torch.testing.assert_close(tensor, average_at_3[name])  # step 3's evaluation ran on the average
    final = expected_average(recorder.after_step, initial, 0.5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), final[name])  # the model keeps the average
    # Training went on from the raw weights after the evaluation, not from the average.
    assert not torch.equal(recorder.after_step[3]["score.weight"], final["score.weight"])


def test_ema_checkpoint_resumes_the_average(tmp_path):
    def run(max_steps, resume=None):
        model = tiny_model()
        trainer = trainer_for(tmp_path, model=model, callbacks=[EMACallback(0.9)], max_steps=max_steps,
                              save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    uninterrupted = run(6)
    saved = load_file(tmp_path / "checkpoint-3" / EMA_FILE)
    assert set(saved) == set(uninterrupted)
    resumed = run(6, resume=str(tmp_path / "checkpoint-3"))
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name])


@pytest.mark.parametrize("decay", [0, 1, 1.5, True, "0.9"])
def test_bad_ema_decay_is_refused(decay):
    with pytest.raises(ValueError, match=r"EMA decay must be a number in \(0, 1\)"):
        EMACallback(decay)


# --- sandwich rule and in-place distillation --------------------------------------------------------------


def test_sandwich_budgets_are_full_drawn_and_smallest_once_each():
    sampler = BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=0)
    rule = SandwichRule(sampler)
    for step in range(50):
        budgets = rule.budgets(step)
        assert budgets[0] == NUM_FILTERS and budgets[-1] == 2
        assert set(budgets) == {NUM_FILTERS, sampler(step), 2}
        assert budgets == sorted(set(budgets), reverse=True)


@pytest.mark.parametrize("distillation", [True, False])
def test_sandwich_loss_is_the_full_loss_plus_the_smaller_budgets_terms(tmp_path, distillation):
    sampler = BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=0)
    rule = SandwichRule(sampler, distillation=distillation)
    trainer = trainer_for(tmp_path, sandwich=rule)
    model, inputs = trainer.model.train(), batch()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, inputs)
    full, *smaller = rule.budgets(0)
    assert len(smaller) >= 1
    teacher = model(**inputs, spectral_budget=full)
    expected = teacher.loss
    for budget in smaller:
        student = model(**inputs, spectral_budget=budget)
        if distillation:
            p = F.softmax(teacher.logits, -1)
            expected = expected + (p * (p.log() - F.log_softmax(student.logits, -1))).sum(-1).mean()
        else:
            expected = expected + student.loss
    torch.testing.assert_close(loss, expected)
    # The teacher's predictions are detached: the distillation terms add no gradient through them.
    model.zero_grad()
    trainer.compute_loss(model, inputs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_distillation_scores_the_labelled_next_tokens_of_a_causal_lm():
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    loss = distillation_loss(student, teacher, labels, causal_lm=True)
    keep = labels[:, 1:] != -100  # position t is scored where label t + 1 exists
    p = F.log_softmax(teacher[:, :-1][keep], -1)
    q = F.log_softmax(student[:, :-1][keep], -1)
    torch.testing.assert_close(loss, (p.exp() * (p - q)).sum(-1).mean())
    assert distillation_loss(teacher, teacher, labels, causal_lm=True).abs() < 1e-6
    torch.testing.assert_close(distillation_loss(student, teacher, labels, True, num_items_in_batch=14),
                               (p.exp() * (p - q)).sum() / 14)


def test_sandwich_trains_with_the_trainer(tmp_path):
    sampler = BudgetSampler("paper", num_filters=NUM_FILTERS, full_every=0, seed=0)
    trainer = trainer_for(tmp_path, sandwich=SandwichRule(sampler), max_steps=3)
    budgets_seen = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: budgets_seen.append(kwargs.get("spectral_budget")), with_kwargs=True)
    trainer.train()
    expected = [b for step in range(3) for b in SandwichRule(sampler).budgets(step)]
    assert budgets_seen == expected
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_every_evaluation_also_measures_the_eval_budgets(tmp_path):
    model = tiny_model()
    trainer = trainer_for(tmp_path, model=model, eval_budgets=[2, 4, [2, 8]])
    metrics = trainer.evaluate()
    model.config.spectral_budget = [2, 8]  # a per-layer budget is labelled with each layer's
    assert metrics["eval_loss_k2-8"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
    for budget in (2, 4):
        model.config.spectral_budget = budget  # the same data evaluated with the model's default set by hand
        assert metrics[f"eval_loss_k{budget}"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
    model.config.spectral_budget = None
    assert metrics["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)  # the default, K
    assert len({metrics["eval_loss"], metrics["eval_loss_k2"], metrics["eval_loss_k4"]}) == 3
    assert trainer.state.log_history[0]["eval_loss_k4"] == metrics["eval_loss_k4"]  # logged with the rest


def test_eval_budgets_outside_the_range_are_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"spectral_budget must be an integer in \[2, 8\]"):
        trainer_for(tmp_path, eval_budgets=[1])
