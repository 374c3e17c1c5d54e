"""HF-native AttnRes language model, registered with the Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import AttnResConfig
from .modeling import AttnResForCausalLM, AttnResModel, AttnResPreTrainedModel, enable_activation_checkpointing

AutoConfig.register(AttnResConfig.model_type, AttnResConfig, exist_ok=True)
AutoModelForCausalLM.register(AttnResConfig, AttnResForCausalLM, exist_ok=True)

__all__ = ["AttnResConfig", "AttnResForCausalLM", "AttnResModel", "AttnResPreTrainedModel",
           "enable_activation_checkpointing"]
