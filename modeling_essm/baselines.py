"""Transformer and Mamba baselines with the parameter count of an ES-SSM.

`matched_baseline(name, essm_config, task)` builds a Llama (SDPA attention) or a Mamba model
for a task whose parameter count is within 10% of the full ES-SSM that `essm_config`
describes: at the ES-SSM's depth when a width gets there, else at the nearest depth that does.
Language modelling uses `LlamaForCausalLM` / `MambaForCausalLM`; classification uses
`LlamaForSequenceClassification` and `MambaForSequenceClassification` below, which pool the
sequence as the ES-SSM classifier does (masked mean) so that the head is not what differs:
with transformers' own last-token Llama head, Llama stayed at chance on byte-level IMDb. Real-valued inputs (audio) reach either through a linear input
projection into `inputs_embeds`, as they reach the ES-SSM through its `input_proj`.

Only the benchmarks import this module; the modeling files never do.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    MambaConfig,
    MambaForCausalLM,
    MambaModel,
    MambaPreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from .training import is_language_model, model_class_for


BASELINES = ("llama", "mamba")
PARAMETER_TOLERANCE = 0.10
WIDTH_STEP = 8  # Llama's 4 heads need an even head size: widths are multiples of 8 for both baselines
WIDEST = 4096
LLAMA_HEADS = 4
LLAMA_FFN_RATIO = 8 / 3  # a SwiGLU feed-forward of 8/3 D has the parameters of a 4 D GELU one


def count_parameters(model):
    """Trainable tensors, each counted once (tied embeddings too): what `num_parameters()` reports for the ES-SSM."""
    return sum(parameter.numel() for parameter in model.parameters())


def masked_mean(hidden_states, attention_mask):
    """(B, T, D) -> (B, D): the mean over the positions the mask keeps, wherever the padding sits."""
    if attention_mask is None:
        return hidden_states.mean(1)
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class MeanPoolingClassifier:
    """A backbone, masked mean pooling over the sequence and a linear head; single-label cross-entropy.

    Mixed in before a `PreTrainedModel` class that names its `backbone_class`; the backbone is
    stored under the model family's `base_model_prefix`, as transformers' own heads store it.
    """

    backbone_class = None
    # The loss is a per-batch mean: the Trainer must divide it by the accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, self.backbone_class(config))
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
        backbone = getattr(self, self.base_model_prefix)
        outputs = backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        logits = self.score(masked_mean(outputs.last_hidden_state, attention_mask))  # (B, num_labels)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class LlamaForSequenceClassification(MeanPoolingClassifier, LlamaPreTrainedModel):
    backbone_class = LlamaModel


class MambaForSequenceClassification(MeanPoolingClassifier, MambaPreTrainedModel):
    backbone_class = MambaModel


class RealValuedInputs(nn.Module):
    """Feeds real-valued features (B, T) or (B, T, F) to a token model through a linear projection into `inputs_embeds`."""

    def __init__(self, model, input_size):
        super().__init__()
        self.model = model
        self.config = model.config
        self.input_size = input_size
        self.input_proj = nn.Linear(input_size, model.config.hidden_size)

    def can_generate(self) -> bool:
        """Whether the wrapped model generates (its `Trainer` and evaluation treat it as a language model)."""
        return self.model.can_generate()

    def forward(self, input_values, attention_mask=None, labels=None):
        if input_values.ndim == 2 and self.input_size == 1:
            input_values = input_values.unsqueeze(-1)
        inputs_embeds = self.input_proj(input_values.to(self.input_proj.weight.dtype))
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)


def token_space(task):
    """(vocab_size, pad_token_id) of a baseline for `task`: real-valued tasks get a one-row
    embedding table that is never read."""
    if task.vocab_size is None:
        return 1, None
    return task.vocab_size, task.pad_token_id


def common_settings(task, hidden_size, num_layers):
    vocab_size, pad_token_id = token_space(task)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=is_language_model(task),  # as the ES-SSM's LM head
        use_cache=False,  # training and scoring only: no generation cache to build
    )
    if task.num_labels is not None:
        settings["num_labels"] = task.num_labels
    return settings


def llama_config(task, hidden_size, num_layers):
    return LlamaConfig(
        **common_settings(task, hidden_size, num_layers),
        num_attention_heads=LLAMA_HEADS,
        num_key_value_heads=LLAMA_HEADS,
        intermediate_size=WIDTH_STEP * math.ceil(LLAMA_FFN_RATIO * hidden_size / WIDTH_STEP),
        max_position_embeddings=task.max_length,
        attn_implementation="sdpa",
    )


def mamba_config(task, hidden_size, num_layers):
    # Without CUDA kernels transformers scans step by step, and training pays a full-size zero fill per
    # position in the backward pass (quadratic in length: 12x slower at 128 positions). With the `mambapy` package
    # installed, use_mambapy runs its parallel scan instead; without it the flag is ignored.
    return MambaConfig(**common_settings(task, hidden_size, num_layers), use_mambapy=True)


MODEL_CLASSES = {  # name -> (config builder, language model class, classifier class)
    "llama": (llama_config, LlamaForCausalLM, LlamaForSequenceClassification),
    "mamba": (mamba_config, MambaForCausalLM, MambaForSequenceClassification),
}


def build_baseline(name, task, hidden_size, num_layers):
    """A freshly initialised baseline `name` for `task` at the given width and depth."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
    make_config, lm_class, classifier_class = MODEL_CLASSES[name]
    model_class = lm_class if is_language_model(task) else classifier_class
    model = model_class(make_config(task, hidden_size, num_layers))
    if task.input_size is not None:
        return RealValuedInputs(model, task.input_size)
    return model


def baseline_parameters(name, task, hidden_size, num_layers):
    with torch.device("meta"):  # shapes only: counting a 20M model this way takes milliseconds
        return count_parameters(build_baseline(name, task, hidden_size, num_layers))


def nearest_width(count_at_width, target):
    """The multiple of WIDTH_STEP whose count is nearest `target`; counts grow with the width."""
    low, high = 1, WIDEST // WIDTH_STEP
    while low < high:  # the smallest width whose count reaches the target
        middle = (low + high) // 2
        if count_at_width(middle * WIDTH_STEP) < target:
            low = middle + 1
        else:
            high = middle
    widths = [steps * WIDTH_STEP for steps in (low - 1, low) if steps >= 1]
    return min(widths, key=lambda width: abs(count_at_width(width) - target))


def match_size(name, task, target, depth, tolerance=PARAMETER_TOLERANCE):
    """(num_layers, hidden_size) of baseline `name` with about `target` parameters.

    Same depth as the ES-SSM when a width gets within `tolerance` there (same number of blocks,
    the fairest comparison); else the nearest depth that does.
    """
    for num_layers in sorted(range(1, 4 * depth + 1), key=lambda layers: (abs(layers - depth), layers)):
        width = nearest_width(lambda w: baseline_parameters(name, task, w, num_layers), target)
        if abs(baseline_parameters(name, task, width, num_layers) / target - 1) <= tolerance:
            return num_layers, width
    raise ValueError(f"no {name} with 1 to {4 * depth} layers comes within {tolerance:.0%} of {target:,} parameters")


def matched_baseline(name, essm_config, task, tolerance=PARAMETER_TOLERANCE):
    """Baseline `name` for `task` within `tolerance` of the parameters of the full ES-SSM of `essm_config`.

    Its signature fits `training.build_trainer(run_config, build_model=...)` once `name` is bound.
    """
    with torch.device("meta"):
        target = count_parameters(model_class_for(task)(essm_config))
    num_layers, hidden_size = match_size(name, task, target, essm_config.num_hidden_layers, tolerance)
    return build_baseline(name, task, hidden_size, num_layers)
