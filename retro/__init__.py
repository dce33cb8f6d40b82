"""RETRO models: chunked cross-attention and RETROfit of Hugging Face decoders. Not built yet:
see the RETRO issue."""
