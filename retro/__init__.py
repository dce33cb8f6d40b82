"""RETRO models: chunked cross-attention over retrieved neighbours (``RetroForCausalLM``) and
RETROfit of Hugging Face decoders (``retrofit``).

Importing the package registers ``model_type="retro"`` and ``"retrofit"`` with transformers' Auto
classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` opens a saved ``RetroForCausalLM`` or
``RetrofitForCausalLM`` in this process; elsewhere the saved directory carries its own code
(``trust_remote_code=True``).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from retromem.retro.configuration_retro import RetroConfig, RetrofitConfig
from retromem.retro.modeling_retro import RetroForCausalLM, RetrofitForCausalLM
from retromem.retro.retrofit import load_retro_weights, retro_config_for, retrofit, save_retro_weights, trainable_fraction

AutoConfig.register(RetroConfig.model_type, RetroConfig, exist_ok=True)
AutoModelForCausalLM.register(RetroConfig, RetroForCausalLM, exist_ok=True)
AutoConfig.register(RetrofitConfig.model_type, RetrofitConfig, exist_ok=True)
AutoModelForCausalLM.register(RetrofitConfig, RetrofitForCausalLM, exist_ok=True)

__all__ = ["RetroConfig", "RetroForCausalLM", "RetrofitConfig", "RetrofitForCausalLM", "retrofit", "retro_config_for", "save_retro_weights",
           "load_retro_weights", "trainable_fraction"]
