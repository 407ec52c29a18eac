"""ES-SSM for Hugging Face transformers. Importing this package registers the Auto classes for model_type "essm"."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_essm import ESSSMConfig
from .modeling_essm import (
    ESSSMForCausalLM,
    ESSSMForSequenceClassification,
    ESSSMModel,
    ESSSMPreTrainedModel,
    resolve_spectral_budget,
)

AutoConfig.register("essm", ESSSMConfig)
AutoModel.register(ESSSMConfig, ESSSMModel)
AutoModelForCausalLM.register(ESSSMConfig, ESSSMForCausalLM)
AutoModelForSequenceClassification.register(ESSSMConfig, ESSSMForSequenceClassification)

# save_pretrained copies the modeling files (and what they import relatively) next to the weights.
ESSSMConfig.register_for_auto_class()
ESSSMModel.register_for_auto_class("AutoModel")
ESSSMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ESSSMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ESSSMConfig",
    "ESSSMPreTrainedModel",
    "ESSSMModel",
    "ESSSMForCausalLM",
    "ESSSMForSequenceClassification",
    "resolve_spectral_budget",
]
