"""The configuration of RETRO models and of the RETRO blocks that RETROfit inserts.

One ``RetroConfig`` serves two uses:

* ``RetroForCausalLM`` (training from scratch): the decoder fields (``vocab_size``,
  ``hidden_size``, ``num_hidden_layers``, ...) describe a Llama-style decoder;
* ``retrofit(model, config)``: the decoder fields are replaced by the base model's, and only the
  retrieval fields (chunk length, neighbours, encoder size, cross-attention layers) are used.

Cross-attention layer positions are 1-based layer numbers as in the paper and Megatron-LM: decoder
layer ``l`` carries a chunked cross-attention (CCA) block, between its self-attention and its
feed-forward (the paper's placement) or on its output (``cca_placement``). The default is
Megatron-LM's ``range(6 if L <= 15 else 9, L + 1, 3)`` ("every 3rd layer from layer 6"); a
decoder of fewer than 6 layers gets CCA after its last layer.
"""

from __future__ import annotations

from transformers import PretrainedConfig


CCA_PLACEMENTS = ("before_mlp", "after_layer")
# The paper's choices, the defaults of new from-scratch training configs (retromem.retro.training).
PAPER_CCA = {"cca_placement": "before_mlp", "cca_relative_positions": True}
# What a config without the keys (saved before they existed) means: the behaviour it was trained with.
LEGACY_CCA = {"cca_placement": "after_layer", "cca_relative_positions": False}


def default_retro_layers(num_hidden_layers: int) -> list[int]:
    """Megatron-LM's RETRO layer numbers (1-based) for a decoder of ``num_hidden_layers`` layers."""
    layers = list(range(6 if num_hidden_layers <= 15 else 9, num_hidden_layers + 1, 3))
    return layers or [num_hidden_layers]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


class RetroConfig(PretrainedConfig):
    """Settings of a RETRO decoder, its neighbour encoder and its chunked cross-attention.

    chunk_length: m, tokens per retrieval chunk (paper: 64).
    num_neighbours: k, neighbours retrieved per chunk (paper: 2).
    neighbour_length: r, tokens per neighbour, the chunk plus its continuation (paper: 2m).
    retro_layers: 1-based decoder layer numbers followed by a CCA block; None: the paper's default.
    encoder_hidden_size / encoder_num_heads / encoder_num_layers / encoder_intermediate_size: the
        neighbour encoder; the CCA blocks attend with ``encoder_num_heads`` heads of width
        ``encoder_hidden_size / encoder_num_heads`` (a narrow encoder keeps RETROfit under 10% of
        the weights). None: half the decoder width, the decoder's head count, 2 layers, 8/3 width.
    gated: True makes every CCA output projection start at zero, so that the model starts exactly
        equal to the model without retrieval (what RETROfit needs; ``RetroForCausalLM`` keeps it
        zero through transformers' initialisation and ``from_pretrained``, a test checks both);
        False: ordinary initialisation.
    cca_placement: where CCA sits in a RETRO layer. ``before_mlp`` (the paper's Algorithm 1):
        between self-attention and feed-forward, h <- h + ATTN(h); h <- h + CCA(h); h <- h + FFW(h),
        and the neighbour encoder reads the first RETRO layer's states after its self-attention.
        ``after_layer``: on the layer's output, and the encoder reads that output.
    cca_relative_positions: rotary positions inside CCA, so that its attention depends on the offset
        between a decoder token and a neighbour token (as RETRO-pytorch does): the decoder token at
        offset i of its CCA span (0..m-1; the span starts at the last token of the retrieving chunk)
        sits at position m - 1 + i, the position of that token in the frame of the retrieving chunk,
        and neighbour token j (0..r-1, chunk then continuation) at position j. A neighbour that
        continues the retrieving chunk thus puts the token the decoder is about to predict at a
        fixed offset (+1), whatever the span offset. False: CCA has no positions.
    The two CCA options default to None, which means the behaviour of configs saved before they
    existed (``after_layer``, no positions), so old checkpoints load unchanged; new from-scratch
    training configs get the paper's choice (:data:`PAPER_CCA`, applied by ``retromem retro train``).
    """

    model_type = "retro"

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 12
    num_attention_heads: int = 9
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    chunk_length: int = 64
    num_neighbours: int = 2
    neighbour_length: int | None = None
    retro_layers: list[int] | None = None
    encoder_hidden_size: int | None = None
    encoder_num_heads: int | None = None
    encoder_num_layers: int = 2
    encoder_intermediate_size: int | None = None
    gated: bool = False
    cca_placement: str | None = None
    cca_relative_positions: bool | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "chunk_length", "num_neighbours", "encoder_num_layers"):
            _positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                             f"`num_key_value_heads` ({self.num_key_value_heads})")
        if self.neighbour_length is None:
            self.neighbour_length = 2 * self.chunk_length
        _positive_int("neighbour_length", self.neighbour_length)
        if self.retro_layers is None:
            self.retro_layers = default_retro_layers(self.num_hidden_layers)
        self.retro_layers = list(self.retro_layers)
        check_retro_layers(self.retro_layers, self.num_hidden_layers)
        if self.encoder_num_heads is None:
            self.encoder_num_heads = self.num_attention_heads
        _positive_int("encoder_num_heads", self.encoder_num_heads)
        if self.encoder_hidden_size is None:
            # half the decoder width, rounded down to a whole number of heads (at least one per head)
            per_head = max(1, self.hidden_size // 2 // self.encoder_num_heads)
            self.encoder_hidden_size = per_head * self.encoder_num_heads
        _positive_int("encoder_hidden_size", self.encoder_hidden_size)
        if self.encoder_hidden_size % self.encoder_num_heads:
            raise ValueError(f"`encoder_hidden_size` ({self.encoder_hidden_size}) must be a multiple of "
                             f"`encoder_num_heads` ({self.encoder_num_heads})")
        if (self.encoder_hidden_size // self.encoder_num_heads) % 2:
            raise ValueError(f"`encoder_hidden_size / encoder_num_heads` must be even (rotary embeddings rotate "
                             f"pairs), got {self.encoder_hidden_size}/{self.encoder_num_heads}")
        if self.encoder_intermediate_size is None:
            self.encoder_intermediate_size = 8 * self.encoder_hidden_size // 3
        _positive_int("encoder_intermediate_size", self.encoder_intermediate_size)
        if self.cca_placement is None:  # a config saved before the option: its behaviour then
            self.cca_placement = LEGACY_CCA["cca_placement"]
        if self.cca_placement not in CCA_PLACEMENTS:
            raise ValueError(f"`cca_placement` must be one of {', '.join(CCA_PLACEMENTS)}, got {self.cca_placement!r}")
        if self.cca_relative_positions is None:
            self.cca_relative_positions = LEGACY_CCA["cca_relative_positions"]
        if not isinstance(self.cca_relative_positions, bool):
            raise ValueError(f"`cca_relative_positions` must be true or false, got {self.cca_relative_positions!r}")
        super().__post_init__(**kwargs)


def check_retro_layers(retro_layers: list[int], num_hidden_layers: int) -> None:
    """ValueError unless ``retro_layers`` are distinct 1-based layer numbers of the decoder."""
    if not retro_layers:
        raise ValueError("`retro_layers` must name at least one decoder layer (1-based), got []")
    for layer in retro_layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_hidden_layers:
            raise ValueError(f"`retro_layers` entries must be layer numbers in [1, {num_hidden_layers}] "
                             f"(1-based, the decoder has {num_hidden_layers} layers), got {layer!r}")
    if len(set(retro_layers)) != len(retro_layers):
        raise ValueError(f"`retro_layers` must not repeat a layer, got {retro_layers}")


# RetroConfig keys that a RETROfit's ``retro`` mapping leaves out (PretrainedConfig bookkeeping)
_NOT_RETRO = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path", "dtype",
              "torch_dtype", "output_attentions", "output_hidden_states", "return_dict", "use_cache")
RETROFIT_WEIGHTS = ("full", "retro")


class RetrofitConfig(PretrainedConfig):
    """A RETROfit: a pretrained decoder (``base_config``) with RETRO blocks (``retro``).

    retro: the RetroConfig fields of the blocks (its decoder fields copied from the base config by
        ``retro_config_for``).
    base_model_type / base_config: the base model's ``model_type`` and the rest of its config. The
        base's model_type is kept beside its config, not inside it: transformers' ``from_pretrained``
        of a base class (``LlamaConfig``) adopts a nested mapping whose model_type is its own.
    base_model_name / base_model_path / base_model_sha256: which pretrained model the blocks were
        trained on (a name or hub id, the local directory it was loaded from, and
        ``modeling_retro.base_weights_sha256`` of its weights). A directory of RETRO weights alone
        loads onto that base and refuses one with another hash.
    weights: what a saved directory holds: ``full`` (base and RETRO weights) or ``retro`` (RETRO weights
        alone; the base comes from the fields above).
    vocab_size: always None at the top level (the vocabulary is the base's). A base class reading this
        config (``LlamaForCausalLM.from_pretrained(dir)``) therefore refuses it, instead of loading the
        base weights and dropping the RETRO ones.
    """

    model_type = "retrofit"

    retro: dict | None = None
    base_model_type: str | None = None
    base_config: dict | None = None
    base_model_name: str | None = None
    base_model_path: str | None = None
    base_model_sha256: str | None = None
    weights: str = "full"
    vocab_size: int | None = None

    def __post_init__(self, **kwargs) -> None:
        if self.vocab_size is not None:  # see the class docstring: the vocabulary lives in base_config
            self.vocab_size = None
        if self.weights not in RETROFIT_WEIGHTS:
            raise ValueError(f"`weights` must be one of {', '.join(RETROFIT_WEIGHTS)}, got {self.weights!r}")
        if self.retro is not None:
            self.retro = {k: v for k, v in dict(self.retro).items() if k not in _NOT_RETRO}
        if self.base_config is not None:
            base = dict(self.base_config)
            model_type = base.pop("model_type", None)
            if self.base_model_type is None:
                self.base_model_type = model_type
            self.base_config = base
        super().__post_init__(**kwargs)

    @classmethod
    def for_base(cls, base_config: PretrainedConfig, retro: RetroConfig, **fields) -> "RetrofitConfig":
        """The RetrofitConfig of a base model's config and the RetroConfig of its blocks."""
        return cls(retro=retro.to_dict(), base_config=base_config.to_dict(), base_model_type=base_config.model_type,
                   **fields)

    def get_base_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        if self.base_model_type is None or self.base_config is None:
            raise ValueError("this RetrofitConfig names no base model config (`base_model_type`, `base_config`)")
        return AutoConfig.for_model(self.base_model_type, **self.base_config)

    def get_retro_config(self) -> RetroConfig:
        if self.retro is None:
            raise ValueError("this RetrofitConfig has no `retro` settings")
        return RetroConfig(**self.retro)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The base model's config: what generate() sizes its key/value cache and special tokens by."""
        if self.base_config is None:
            return self
        return self.get_base_config()
