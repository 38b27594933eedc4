"""Flax GPT-2, Llama, BERT and DistilBERT that load and save Hugging Face checkpoints."""

from jaxrlhf.models.bert import (
    BertForSequenceClassification,
    BertModel,
    DistilBertForSequenceClassification,
    DistilBertModel,
)
from jaxrlhf.models.configs import BertConfig, DistilBertConfig, GPT2Config, LlamaConfig
from jaxrlhf.models.gpt2 import CausalLMOutput, GPT2LMHeadModel, GPT2Model
from jaxrlhf.models.layers import frozen_params
from jaxrlhf.models.llama import LlamaForCausalLM, LlamaModel
from jaxrlhf.models.hub import (
    check_tokenizer,
    from_config,
    load_config,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)

__all__ = [
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "CausalLMOutput",
    "DistilBertConfig",
    "DistilBertForSequenceClassification",
    "DistilBertModel",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "check_tokenizer",
    "from_config",
    "frozen_params",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
