"""ES-SSM for Hugging Face transformers. Importing this package registers the Auto classes for model_type "essm"."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .budget import BudgetSampler, BudgetSamplingCallback
from .cache_essm import ESSSMCache
from .configuration_essm import ESSSMConfig
from .modeling_essm import (
    ESSSMForCausalLM,
    ESSSMForSequenceClassification,
    ESSSMModel,
    ESSSMPreTrainedModel,
    resolve_spectral_budget,
)
from .spectral_filters import num_filters_for_length
from .tokenization_essm import ESSSMTokenizer, build_fast_tokenizer

AutoConfig.register("essm", ESSSMConfig)
AutoModel.register(ESSSMConfig, ESSSMModel)
AutoModelForCausalLM.register(ESSSMConfig, ESSSMForCausalLM)
AutoModelForSequenceClassification.register(ESSSMConfig, ESSSMForSequenceClassification)
AutoTokenizer.register(ESSSMConfig, tokenizer_class=ESSSMTokenizer)

# save_pretrained copies the modeling files (and what they import relatively) next to the weights.
ESSSMConfig.register_for_auto_class()
ESSSMModel.register_for_auto_class("AutoModel")
ESSSMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ESSSMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
ESSSMTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = [
    "BudgetSampler",
    "BudgetSamplingCallback",
    "ESSSMCache",
    "ESSSMConfig",
    "ESSSMPreTrainedModel",
    "ESSSMModel",
    "ESSSMForCausalLM",
    "ESSSMForSequenceClassification",
    "ESSSMTokenizer",
    "build_fast_tokenizer",
    "num_filters_for_length",
    "resolve_spectral_budget",
]
