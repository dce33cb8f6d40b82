"""Memory modules for Hugging Face decoders: AutoCompressor summary vectors
(:mod:`retromem.memory.autocompressor`) and Infini-attention (:mod:`retromem.memory.infini_attention`), with
fine-tuning (:mod:`retromem.memory.training`) and long-context evaluation (:mod:`retromem.memory.evaluation`,
:mod:`retromem.memory.passkey`). Importing this package registers the model types ``infini_attention`` and
``autocompressor`` with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``. Training-free long
context for unmodified RoPE decoders: :mod:`retromem.memory.kv_budget` (the shared bounded KV cache and
StreamingLLM), :mod:`retromem.memory.lm_infinite`, :mod:`retromem.memory.infllm`,
:mod:`retromem.memory.sirllm`, :mod:`retromem.memory.squeezed`, evaluated by
:mod:`retromem.memory.long_context_eval`."""

from retromem.memory.autocompressor import (AutoCompressorConfig, AutoCompressorLM, AutoCompressorLMConfig, SummaryStore,
                                            precompute_summaries)
from retromem.memory.common import MemoryCache, UnsupportedModelError
from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM, InfiniAttentionLMConfig, InfiniMemory
# training-free bounded KV memories for unmodified RoPE decoders (issue 20)
from retromem.memory.infllm import InfLLM, InfLLMConfig
from retromem.memory.kv_budget import FullAttention, KVMemory, StreamingLLM
from retromem.memory.lm_infinite import LMInfinite, LMInfiniteConfig
from retromem.memory.sirllm import SirLLM, SirLLMConfig
from retromem.memory.squeezed import SqueezedAttention, SqueezedConfig

__all__ = ["AutoCompressorConfig", "AutoCompressorLM", "AutoCompressorLMConfig", "SummaryStore", "precompute_summaries",
           "MemoryCache", "UnsupportedModelError", "InfiniAttentionConfig", "InfiniAttentionLM", "InfiniAttentionLMConfig",
           "InfiniMemory", "KVMemory", "FullAttention", "StreamingLLM", "LMInfinite", "LMInfiniteConfig", "InfLLM",
           "InfLLMConfig", "SirLLM", "SirLLMConfig", "SqueezedAttention", "SqueezedConfig"]
