"""The lab decoder: pre-norm transformer blocks assembled from the components in `LabConfig`.

Written by hand because the point of the lab is choosing the components (transformers has
each one only inside a fixed model). Everything around the blocks is transformers' own, so
the model behaves like any hub model: `create_causal_mask` builds causal, padding and
packed-document masks (position ids that restart per document give a block-diagonal mask),
`DynamicCache` holds the KV cache for `generate`, RoPE/YaRN frequencies come from
`ROPE_INIT_FUNCTIONS`, and attention runs through `ALL_ATTENTION_FUNCTIONS` (SDPA, eager, or
flash-attn when installed).

ALiBi (Press et al. 2022) adds `-slope_h * (i - j)` to head h's attention scores; the bias
is passed to SDPA as its `position_bias` (a float mask), so it needs SDPA or eager attention
(flash-attn kernels get no bias through transformers: an ALiBi model refuses them).
Sinusoidal encodings (Vaswani et al. 2017) are added to embeddings scaled by sqrt(d_model),
computed from the position ids, so they restart with every packed document too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lmforge.lab.configuration import LabConfig


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes: a geometric sequence 2^(-8/n), 2^(-16/n), … for n a power of two;
    otherwise the closest power of two's slopes plus every other slope of the next one (the paper's)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return torch.tensor(power_of_two(heads))
    closest = 2 ** math.floor(math.log2(heads))
    return torch.tensor(power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest])


def sinusoidal_encoding(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """(…, dim) encodings: sin(p / 10000^(2i/dim)) at even dims, cos at odd ones."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
    angles = position_ids[..., None].float() * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, or YaRN (frequencies and attention factor from transformers).

    Laid out as transformers' rotary modules are (`rope_type`, `inv_freq`, `original_inv_freq`,
    `compute_default_rope_parameters`), so `from_pretrained`, which builds the model on the meta
    device, recomputes the frequencies like it does for LLaMA's.
    """

    def __init__(self, config: LabConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init = self.compute_default_rope_parameters
        if self.rope_type != "default":
            init = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: LabConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        theta, dim = config.rope_parameters["rope_theta"], config.head_dim
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def make_norm(config: LabConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class LabMLP(nn.Module):
    """up -> activation -> down; swiglu gates it: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LabConfig):
        super().__init__()
        width = config.intermediate_size
        self.gated = config.hidden_act == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, width, bias=config.bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.bias)
        self.act = {
            "relu": nn.ReLU(),
            "gelu": nn.GELU(),
            "leaky_relu": nn.LeakyReLU(config.leaky_relu_slope),
            "silu": nn.SiLU(),
            "swiglu": nn.SiLU(),
        }[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return (
        states[:, :, None]
        .expand(batch, heads, groups, length, dim)
        .reshape(batch, heads * groups, length, dim)
    )


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.groups)
    value = repeat_kv(value, module.groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class LabAttention(nn.Module):
    """Multi-head, grouped-query or multi-query attention (by num_key_value_heads)."""

    def __init__(self, config: LabConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.num_key_value_groups = self.groups  # the name transformers' attention functions read
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        heads, kv_heads, width = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        self.q_proj = nn.Linear(width, heads * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(width, kv_heads * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(width, kv_heads * self.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(heads * self.head_dim, width, bias=config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        position_bias: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_rotary(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        implementation = self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        extra = {}
        if position_bias is not None:
            extra["position_bias"] = position_bias
            if implementation != "eager":
                attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous())


class LabBlock(GradientCheckpointingLayer):
    """x + attn(norm(x)), then x + mlp(norm(x)); dropout on both residual branches."""

    def __init__(self, config: LabConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.self_attn = LabAttention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = LabMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_bias: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attended = self.self_attn(
            self.attn_norm(hidden_states),
            attention_mask,
            position_embeddings,
            position_bias,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


class LabPreTrainedModel(PreTrainedModel):
    config_class = LabConfig
    config: LabConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LabBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @property
    def _supports_flash_attn(self) -> bool:  # type: ignore[override]
        # transformers reads this flag from the instance: ALiBi's bias cannot reach flash-attn kernels.
        return self.config.position_type != "alibi"


class LabModel(LabPreTrainedModel):
    def __init__(self, config: LabConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(LabBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.rotary_emb = RotaryEmbedding(config) if config.rotary else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)

        alibi = self.config.position_type == "alibi"
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            # ALiBi's bias is a full (query, key) matrix: materialise the mask it is merged into.
            allow_is_causal_skip=not alibi,
        )
        hidden_states = inputs_embeds
        if self.config.position_type == "sinusoidal":
            hidden_states = hidden_states * math.sqrt(self.config.hidden_size)
            hidden_states = hidden_states + sinusoidal_encoding(position_ids, self.config.hidden_size).to(
                hidden_states.dtype
            )
        hidden_states = self.embed_dropout(hidden_states)
        position_embeddings = (
            self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None
        )
        position_bias = self.alibi_bias(past, length, hidden_states) if alibi else None

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_bias=position_bias,
                past_key_values=past_key_values,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            past_key_values=past_key_values if use_cache else None,
        )

    def alibi_bias(self, past: int, length: int, like: torch.Tensor) -> torch.Tensor:
        """(1, heads, length, past + length) bias -slope * (i - j) for keys j before query i.

        Distances count tokens of the row, so the bias is the same with or without left padding
        (a shift of both indices) and within each packed document (the mask hides the others).
        """
        queries = torch.arange(past, past + length, device=like.device)
        keys = torch.arange(past + length, device=like.device)
        distance = (queries[:, None] - keys[None, :]).clamp(min=0).to(torch.float32)
        slopes = alibi_slopes(self.config.num_attention_heads).to(like.device)
        bias = -slopes[:, None, None] * distance
        return bias.unsqueeze(0).to(like.dtype)


class LabForCausalLM(LabPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LabConfig):
        super().__init__(config)
        self.model = LabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


class LabForSequenceClassification(GenericForSequenceClassification, LabPreTrainedModel):
    """A scalar (or n-label) head on the last non-pad token: reward models on lab models."""
