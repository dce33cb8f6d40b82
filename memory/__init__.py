"""Memory modules for Hugging Face decoders: AutoCompressor summary vectors
(:mod:`memory.autocompressor`) and Infini-attention (:mod:`memory.infini_attention`), with
fine-tuning (:mod:`memory.training`) and long-context evaluation (:mod:`memory.evaluation`,
:mod:`memory.passkey`)."""

from memory.autocompressor import AutoCompressorConfig, AutoCompressorLM, SummaryStore, precompute_summaries
from memory.common import UnsupportedModelError
from memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM, InfiniMemory

__all__ = ["AutoCompressorConfig", "AutoCompressorLM", "SummaryStore", "precompute_summaries", "UnsupportedModelError",
           "InfiniAttentionConfig", "InfiniAttentionLM", "InfiniMemory"]
