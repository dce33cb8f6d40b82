"""Memory modules for Hugging Face decoders: AutoCompressor summary vectors
(:mod:`retromem.memory.autocompressor`) and Infini-attention (:mod:`retromem.memory.infini_attention`), with
fine-tuning (:mod:`retromem.memory.training`) and long-context evaluation (:mod:`retromem.memory.evaluation`,
:mod:`retromem.memory.passkey`)."""

from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM, SummaryStore, precompute_summaries
from retromem.memory.common import UnsupportedModelError
from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM, InfiniMemory

__all__ = ["AutoCompressorConfig", "AutoCompressorLM", "SummaryStore", "precompute_summaries", "UnsupportedModelError",
           "InfiniAttentionConfig", "InfiniAttentionLM", "InfiniMemory"]
