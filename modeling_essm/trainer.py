"""Training recipes for ES-SSM with the transformers `Trainer`.

- `paper_training_arguments`: the optimisation recipe of the ES-SSM paper (AdamW lr 2e-4, betas (0.9, 0.95),
  weight decay 0.03, 6% warm-up then cosine to 10% of the peak, clipping at 1.0).
- `ESSSMTrainer`: the `Trainer` with two options that change what a step optimises:
  `decay_embeddings=False` keeps weight decay off the embeddings (the Trainer already spares biases and norms),
  and the sandwich rule of slimmable networks (Yu & Huang, 2019): every step trains the full budget, a drawn
  one and the smallest one, the smaller budgets learning from the full budget's detached predictions
  (in-place distillation) or from the labels; and `eval_budgets`, budgets every evaluation also measures.
- `EMACallback`: an exponential moving average of the weights, used for evaluation and for the final model.

All of them work for any model the Trainer trains; only the sandwich rule and `eval_budgets` need an ES-SSM.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .budget import BudgetSampler
from .modeling_essm import resolve_spectral_budget

IGNORE_INDEX = -100
EMA_FILE = "ema_weights.safetensors"


def paper_training_arguments(output_dir, **overrides) -> TrainingArguments:
    """`TrainingArguments` with the paper's optimiser and schedule; `overrides` win (e.g. max_steps, batch size)."""
    recipe = dict(
        learning_rate=2e-4,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.03,
        warmup_steps=0.06,  # a fraction of the run
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        max_grad_norm=1.0,
    )
    return TrainingArguments(output_dir=output_dir, **{**recipe, **overrides})


def embedding_parameters(model: nn.Module) -> set[int]:
    """Ids of every embedding table's weight (a tied output head shares it)."""
    return {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}


def without_embeddings(model: nn.Module, names) -> list[str]:
    """The parameters named in `names` that are not an embedding table (nor a head tied to one)."""
    embeddings = embedding_parameters(model)
    return [name for name, parameter in model.named_parameters() if name in names and id(parameter) not in embeddings]


def distillation_loss(student_logits, teacher_logits, labels, causal_lm: bool, num_items_in_batch=None):
    """KL(teacher || student) over the predictions the task loss scores: every row, or every labelled next token.

    Averaged like the task loss: per labelled token for a causal LM (over the whole accumulated batch when
    `num_items_in_batch` is given), per row for a classifier.
    """
    if causal_lm:
        keep = labels[:, 1:] != IGNORE_INDEX  # logits at t predict the label at t + 1
        student_logits, teacher_logits = student_logits[:, :-1][keep], teacher_logits[:, :-1][keep]
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    per_prediction = (teacher.exp() * (teacher - student)).sum(-1)
    if causal_lm and num_items_in_batch is not None:
        return per_prediction.sum() / num_items_in_batch
    return per_prediction.mean()


class SandwichRule:
    """The budgets of one step: the full budget K, the step's draw of `sampler` and the smallest budget.

    A draw equal to K or to the smallest budget is trained once. The draw is the sampler's, a pure function of
    `(seed, step)`, so every process and every micro-batch of a step trains the same budgets.
    """

    def __init__(self, sampler: BudgetSampler, distillation: bool = True):
        if not isinstance(distillation, bool):
            raise ValueError(f"distillation must be true or false, got {distillation!r}")
        if sampler.per_layer:
            raise ValueError("the sandwich rule trains whole-model budgets (K, a draw, the smallest): use it without "
                             "per-layer draws (budget.per_layer)")
        self.sampler = sampler
        self.distillation = distillation

    def budgets(self, step: int) -> list[int]:
        """[K, then the smaller budgets of the step in decreasing order]."""
        smaller = {self.sampler(step), self.sampler.min_budget} - {self.sampler.num_filters}
        return [self.sampler.num_filters, *sorted(smaller, reverse=True)]


class ESSSMTrainer(Trainer):
    """The transformers `Trainer` with the ES-SSM training options.

    decay_embeddings: when False, weight decay spares the embedding tables (and a head tied to them) as it
        spares biases and norms: the paper's recipe. Applies to any model, so baselines can share the optimiser.
    sandwich: a `SandwichRule`; each step then sums the losses of its budgets, the smaller ones distilled from
        the full budget's detached predictions when `sandwich.distillation` is set. Without it the model trains
        at whatever budget its forward gets (`BudgetSamplingCallback` draws one per step).
    eval_budgets: budgets that every evaluation also measures, beside the model's default budget: the metrics
        gain `eval_<metric>_k<k>` (for example `eval_loss_k4`, `eval_accuracy_k4`; a per-layer budget [2, 8] gives
        `eval_loss_k2-8`), logged with the others.
    """

    def __init__(self, *args, decay_embeddings: bool = True, sandwich: SandwichRule | None = None,
                 eval_budgets=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.decay_embeddings = decay_embeddings
        self.sandwich = sandwich
        # Checked against the model now, not at the first evaluation.
        self.eval_budgets = [resolve_spectral_budget(k, self.model.config) for k in eval_budgets or ()]

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The loop at the default budget, then at each of `eval_budgets`, as one evaluation (one log, one
        `on_evaluate`, so callbacks such as EMACallback see a single evaluation)."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if not self.eval_budgets:  # also every model without budgets (the baselines share this trainer)
            return output
        config = self.model.config
        default = config.spectral_budget
        try:
            for budget in self.eval_budgets:
                config.spectral_budget = budget  # what every call without a budget runs at
                at_budget = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                                    metric_key_prefix)
                label = "-".join(map(str, budget)) if isinstance(budget, list) else budget  # per layer: k2-8
                output.metrics.update({f"{key}_k{label}": value for key, value in at_budget.metrics.items()
                                       if not key.endswith(("_runtime", "_per_second"))})
        finally:
            config.spectral_budget = default
        return output

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        return names if self.decay_embeddings else without_embeddings(model, names)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.sandwich is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        full_budget, *smaller = self.sandwich.budgets(self.state.global_step)
        loss, outputs = super().compute_loss(model, {**inputs, "spectral_budget": full_budget}, True,
                                             num_items_in_batch)
        teacher = outputs.logits.detach()
        causal_lm = getattr(self.accelerator.unwrap_model(model), "can_generate", lambda: False)()
        for budget in smaller:
            if self.sandwich.distillation:
                student = model(**{name: value for name, value in inputs.items() if name != "labels"},
                                spectral_budget=budget).logits
                loss = loss + distillation_loss(student, teacher, inputs.get("labels"), causal_lm,
                                                num_items_in_batch if self.model_accepts_loss_kwargs else None)
            else:
                loss = loss + super().compute_loss(model, {**inputs, "spectral_budget": budget}, False,
                                                   num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


class EMACallback(TrainerCallback):
    """An exponential moving average of the trainable weights, for evaluation and the final model.

    After each optimizer step `ema = d * ema + (1 - d) * weights`, with `d = min(decay, (1 + step) / (10 + step))`
    so that a short run is not dominated by its first, random weights. Evaluations during training run on the
    average (it is swapped in and back out around them); checkpoints hold the raw weights, for resuming, plus the
    average in `ema_weights.safetensors`, which a resumed run picks up. When training ends the model keeps the
    average, so `trainer.evaluate()` and `trainer.save_model()` afterwards use it.
    """

    def __init__(self, decay: float = 0.999):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be a number in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.average = None
        self._raw = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / EMA_FILE
        parameters = self._parameters(model)
        if state.global_step > 0 and saved.is_file():
            self.average = {name: tensor.to(parameters[name].device) for name, tensor in load_file(saved).items()}
        else:
            self.average = {name: p.detach().float().clone() for name, p in parameters.items()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        weight = 1.0 - min(self.decay, (1 + state.global_step) / (10 + state.global_step))
        for name, parameter in self._parameters(model).items():
            self.average[name].lerp_(parameter.detach().float(), weight)
        if control.should_evaluate:
            self._raw = {name: p.detach().clone() for name, p in self._parameters(model).items()}
            self._load(model, self.average)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self._raw is not None:  # an evaluation during training: back to the weights being trained
            self._load(model, self._raw)
            self._raw = None

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_file({name: tensor.contiguous().cpu() for name, tensor in self.average.items()}, folder / EMA_FILE)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._load(model, self.average)

    @staticmethod
    def _parameters(model):
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def _load(self, model, weights):
        for name, parameter in self._parameters(model).items():
            parameter.copy_(weights[name])


__all__ = ["ESSSMTrainer", "EMACallback", "SandwichRule", "distillation_loss", "paper_training_arguments"]
