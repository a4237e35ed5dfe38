"""`lmforge lab build` and `lmforge lab info`: a lab model from its spec, and what it costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from lmforge.lab.configuration import LabConfig
from lmforge.lab.modeling import LabForCausalLM
from lmforge.lab.spec import ArchSpec, load_arch

ARCH_FILE = "lab_arch.yaml"  # the spec, saved beside the weights


def lab_config(spec: ArchSpec, tokenizer: PreTrainedTokenizerBase) -> LabConfig:
    """The Hugging Face config of `spec`, with the tokenizer's vocabulary and special tokens."""
    rope = None
    if spec.position == "rope":
        rope = {"rope_type": "default", "rope_theta": spec.rope_theta or 10000.0}
    elif spec.position == "yarn":
        assert spec.yarn is not None
        rope = {
            "rope_type": "yarn",
            "rope_theta": spec.rope_theta or 10000.0,
            "factor": spec.yarn.factor,
            "original_max_position_embeddings": spec.yarn.original_max_position_embeddings,
            "beta_fast": spec.yarn.beta_fast,
            "beta_slow": spec.yarn.beta_slow,
        }
    return LabConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.d_model,
        intermediate_size=spec.ff_width,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        hidden_act=spec.activation,
        leaky_relu_slope=spec.leaky_relu_slope,
        norm_type=spec.norm,
        norm_eps=spec.norm_eps,
        position_type=spec.position,
        rope_parameters=rope,
        max_position_embeddings=spec.max_position_embeddings,
        hidden_dropout=spec.dropout,
        attention_dropout=spec.attention_dropout,
        bias=spec.bias,
        initializer_range=spec.init_std,
        tie_word_embeddings=spec.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(spec: ArchSpec, tokenizer: PreTrainedTokenizerBase) -> LabForCausalLM:
    """A freshly initialised model (seeded by `spec.seed`, so the same spec gives the same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LabForCausalLM(lab_config(spec, tokenizer))
    return model.eval()


def new_model(arch: str | Path, tokenizer: PreTrainedTokenizerBase, attention: str) -> LabForCausalLM:
    """A freshly built model of the architecture YAML `arch`, in float32 (mixed precision keeps
    float32 master weights, which pre-training from scratch needs), with `attention` (SDPA for
    ALiBi, whose bias flash-attn kernels cannot take)."""
    spec = load_arch(arch)
    model = build_model(spec, tokenizer)
    if spec.position == "alibi" and attention.startswith("flash"):
        attention = "sdpa"
    model.set_attn_implementation(attention)
    return model


def build(spec: ArchSpec, out: Path, tokenizer: PreTrainedTokenizerBase, template) -> Path:
    """Build the model of `spec` and save it (safetensors, `tokenizer`, the chat `template`, spec,
    card) to `out`, atomically."""
    from lmforge.artifacts import atomic_folder, save_artifact

    model = build_model(spec, tokenizer)
    card = "\n## Architecture (lmforge lab)\n\n" + describe(spec, count_parameters(model)) + "\n"
    with atomic_folder(Path(out)) as tmp:
        save_artifact(model, tokenizer, template, tmp / "model", "model", card_extra=card)
        for item in (tmp / "model").iterdir():
            item.rename(tmp / item.name)
        (tmp / "model").rmdir()
        (tmp / ARCH_FILE).write_text(
            yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
        )
    return Path(out)


@dataclass
class Count:
    component: str
    parameters: int


def count_parameters(model: torch.nn.Module) -> list[Count]:
    """Parameters per component (embeddings, attention, feed-forward, norms, head), each tensor once."""
    buckets: dict[str, int] = {}
    seen: set[int] = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if "embed_tokens" in name:
            component = "embeddings"
        elif "lm_head" in name:
            component = "output head"
        elif "self_attn" in name:
            component = "attention"
        elif ".mlp." in name:
            component = "feed-forward"
        elif "norm" in name:
            component = "norms"
        else:
            component = "other"
        buckets[component] = buckets.get(component, 0) + parameter.numel()
    order = ["embeddings", "attention", "feed-forward", "norms", "output head", "other"]
    return [Count(c, buckets[c]) for c in order if c in buckets]


def flops_per_token(config: LabConfig, context: int) -> int:
    """Forward FLOPs per token at a `context`-token sequence.

    2 per weight of every matrix multiply (attention and feed-forward projections and the output
    head; embedding lookups are free), plus attention itself: scores (q·k) and the weighted sum
    of values, 2·context·head_dim each per head, per layer. Training costs about 3x this.
    """
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim
    projections = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o and k, v
    matrices = 3 if config.hidden_act == "swiglu" else 2
    feed_forward = matrices * d * config.intermediate_size
    per_layer = 2 * (projections + feed_forward) + 2 * 2 * context * heads * head_dim
    return config.num_hidden_layers * per_layer + 2 * d * config.vocab_size


def describe(spec: ArchSpec, counts: list[Count]) -> str:
    total = sum(c.parameters for c in counts)
    lines = [
        f"- position: {spec.position}; norm: {spec.norm}; activation: {spec.activation}; "
        f"attention: {spec.attention_kind} ({spec.n_heads} query, {spec.kv_heads} key/value heads)",
        f"- d_model {spec.d_model}, {spec.n_layers} layers, d_ff {spec.ff_width}, "
        f"tied embeddings: {spec.tie_embeddings}",
        f"- parameters: {total:,}",
    ]
    return "\n".join(lines)


@dataclass
class ModelInfo:
    config: LabConfig
    counts: list[Count]
    context: int
    flops: int  # forward FLOPs per token at `context`

    @property
    def total(self) -> int:
        return sum(c.parameters for c in self.counts)


def model_info(
    source: str | Path, context: int | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> ModelInfo:
    """Parameters per component and FLOPs per token of a built lab model folder, or of an
    architecture YAML with its `tokenizer` (built in memory, on the meta device: nothing is
    allocated)."""
    from transformers import AutoConfig

    source = Path(source)
    if source.is_file():
        if tokenizer is None:
            raise ValueError(f"{source}: an architecture YAML needs its tokenizer to count the embeddings")
        config = lab_config(load_arch(source), tokenizer)
    elif (source / "config.json").is_file():
        config = AutoConfig.from_pretrained(source)
        if not isinstance(config, LabConfig):
            raise ValueError(
                f"{source} holds a {config.model_type} model; `lmforge lab info` reads lab models "
                "(built by `lmforge lab build`) and architecture YAMLs"
            )
    else:
        raise FileNotFoundError(
            f"{source} is neither an architecture YAML nor a model folder with config.json"
        )
    with torch.device("meta"):
        model = LabForCausalLM(config)
    context = context or config.max_position_embeddings
    return ModelInfo(config, count_parameters(model), context, flops_per_token(config, context))
