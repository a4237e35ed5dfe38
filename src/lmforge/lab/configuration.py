"""The Hugging Face config of a lab model (`model_type: lmforge_lab`)."""

from __future__ import annotations

from transformers import PreTrainedConfig


class LabConfig(PreTrainedConfig):
    """A decoder built from lab components; the field names follow transformers' conventions so
    peft, trl and generation read them as they read LLaMA's."""

    model_type = "lmforge_lab"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "swiglu"
    leaky_relu_slope: float = 0.01
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-5
    position_type: str = "rope"
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bias: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.position_type in ("rope", "yarn") and self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)

    @property
    def rotary(self) -> bool:
        return self.position_type in ("rope", "yarn")
