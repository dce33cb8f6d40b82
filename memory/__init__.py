"""Memory modules for Hugging Face decoders: AutoCompressor summary vectors
(:mod:`retromem.memory.autocompressor`) and Infini-attention (:mod:`retromem.memory.infini_attention`), with
fine-tuning (:mod:`retromem.memory.training`) and long-context evaluation (:mod:`retromem.memory.evaluation`,
:mod:`retromem.memory.passkey`). Importing this package registers the model types ``infini_attention`` and
``autocompressor`` with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``."""

from retromem.memory.autocompressor import (AutoCompressorConfig, AutoCompressorLM, AutoCompressorLMConfig, SummaryStore,
                                            precompute_summaries)
from retromem.memory.common import MemoryCache, UnsupportedModelError
from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM, InfiniAttentionLMConfig, InfiniMemory

__all__ = ["AutoCompressorConfig", "AutoCompressorLM", "AutoCompressorLMConfig", "SummaryStore", "precompute_summaries",
           "MemoryCache", "UnsupportedModelError", "InfiniAttentionConfig", "InfiniAttentionLM", "InfiniAttentionLMConfig",
           "InfiniMemory"]
