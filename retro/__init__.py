"""RETRO models: chunked cross-attention over retrieved neighbours (``RetroForCausalLM``) and
RETROfit of Hugging Face decoders (``retrofit``).

Importing the package registers ``model_type="retro"`` with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` opens a saved ``RetroForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from retromem.retro.configuration_retro import RetroConfig
from retromem.retro.modeling_retro import RetroForCausalLM
from retromem.retro.retrofit import load_retro_weights, retro_config_for, retrofit, save_retro_weights, trainable_fraction

AutoConfig.register(RetroConfig.model_type, RetroConfig, exist_ok=True)
AutoModelForCausalLM.register(RetroConfig, RetroForCausalLM, exist_ok=True)

__all__ = ["RetroConfig", "RetroForCausalLM", "retrofit", "retro_config_for", "save_retro_weights",
           "load_retro_weights", "trainable_fraction"]
