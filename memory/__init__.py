"""Memory modules for Hugging Face decoders: AutoCompressor summary vectors and
Infini-attention. Not built yet: see the memory-modules issue."""
