"""RETRO models: chunked cross-attention over retrieved neighbours (``RetroForCausalLM``) and
RETROfit of Hugging Face decoders (``retrofit``)."""

from retro.configuration_retro import RetroConfig
from retro.modeling_retro import RetroForCausalLM
from retro.retrofit import load_retro_weights, retro_config_for, retrofit, save_retro_weights, trainable_fraction

__all__ = ["RetroConfig", "RetroForCausalLM", "retrofit", "retro_config_for", "save_retro_weights",
           "load_retro_weights", "trainable_fraction"]
