"""The lab decoder: every component combination builds, trains, generates with a KV cache and
reloads exactly; packing, padding and ALiBi behave as their definitions say."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.data.templates import get_template
from lmforge.lab import LabConfig, LabForCausalLM
from lmforge.lab.build import build, build_model, count_parameters, flops_per_token
from lmforge.lab.modeling import alibi_slopes
from lmforge.lab.spec import ArchSpec

POSITIONS = ["sinusoidal", "rope", "alibi", "yarn"]
NORMS = ["layernorm", "rmsnorm"]
KV_HEADS = [4, 2, 1]  # multi-head, grouped-query, multi-query
ACTIVATIONS = ["relu", "gelu", "leaky_relu", "silu", "swiglu"]


def spec_for(
    position: str, norm: str = "rmsnorm", kv: int = 4, activation: str = "swiglu", **more
) -> ArchSpec:
    extra: dict = {}
    if position == "yarn":
        extra = {
            "yarn": {"original_max_position_embeddings": 16, "factor": 4.0},
            "max_position_embeddings": 64,
        }
    return ArchSpec(
        tokenizer="unused",
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=kv,
        activation=activation,
        norm=norm,
        position=position,
        **extra,
        **more,
    )


@pytest.mark.parametrize(
    ("position", "norm", "kv", "activation"), list(itertools.product(POSITIONS, NORMS, KV_HEADS, ACTIVATIONS))
)
def test_every_combination_trains_generates_and_reloads(position, norm, kv, activation, tokenizer, tmp_path):
    model = build_model(spec_for(position, norm, kv, activation), tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))

    # forward + backward: a finite loss and a gradient on every parameter
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    model.eval()

    # greedy generation with the KV cache gives the same tokens as without it
    prompt = ids[:, :5]
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)

    # save (safetensors) and reload through the Auto class: identical logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, LabForCausalLM)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_logits_equal_full_forward(position, tokenizer):
    """Prefill + one token at a time with the cache gives the full forward's logits at every step."""
    model = build_model(spec_for(position, kv=2), tokenizer)
    ids = torch.randint(3, len(tokenizer), (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for i in range(4, 10):
            out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_packed_documents_equal_separate_documents(position, tokenizer):
    """Two documents packed in one row (position ids restarting) give each document's own logits
    (without a KV cache, as in training: transformers detects packed rows only then)."""
    model = build_model(spec_for(position), tokenizer)
    gen = torch.Generator().manual_seed(2)
    first, second = (
        torch.randint(3, len(tokenizer), (1, 7), generator=gen),
        torch.randint(3, 300, (1, 5), generator=gen),
    )
    packed = torch.cat([first, second], dim=1)
    positions = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        together = model(packed, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padded_batch_generates_like_single_rows(position, tokenizer):
    model = build_model(spec_for(position), tokenizer)
    gen = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, 300, (1, 8), generator=gen), torch.randint(3, 300, (1, 5), generator=gen)
    pad = tokenizer.pad_token_id
    batch = torch.cat([long, torch.cat([torch.full((1, 3), pad), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": pad}
    together = model.generate(batch, attention_mask=mask, **settings)
    assert torch.equal(together[0, 8:], model.generate(long, **settings)[0, 8:])
    assert torch.equal(together[1, 8:], model.generate(short, **settings)[0, 5:])


def test_alibi_bias_is_the_papers():
    """Slopes 2^(-8i/n) for n a power of two (the paper's 8 heads: 1/2 … 1/256), and the bias
    the attention gets is -slope * distance."""
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4-head slopes plus every other slope of 8 heads
    torch.testing.assert_close(
        alibi_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    )
    config = LabConfig(
        vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1, position_type="alibi"
    )
    model = LabForCausalLM(config)
    bias = model.model.alibi_bias(past=2, length=2, like=torch.zeros(1))
    slopes = alibi_slopes(2)
    expected = torch.stack([-slope * torch.tensor([[2.0, 1, 0, 0], [3, 2, 1, 0]]) for slope in slopes])
    torch.testing.assert_close(bias[0], expected)


def test_sinusoidal_encoding_values():
    from lmforge.lab.modeling import sinusoidal_encoding

    encoding = sinusoidal_encoding(torch.tensor([0, 3]), 4)
    expected = torch.tensor(
        [[0.0, 1.0, 0.0, 1.0], [math.sin(3), math.cos(3), math.sin(3 / 100), math.cos(3 / 100)]]
    )
    torch.testing.assert_close(encoding, expected)


def test_yarn_uses_transformers_frequencies(tokenizer):
    """YaRN interpolates the low frequencies and keeps the high ones, with a >1 attention factor."""
    rope = build_model(spec_for("rope"), tokenizer).model.rotary_emb
    yarn = build_model(spec_for("yarn"), tokenizer).model.rotary_emb
    assert yarn.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert yarn.inv_freq[0] == pytest.approx(rope.inv_freq[0].item())  # fastest dimension extrapolated
    assert yarn.inv_freq[-1] == pytest.approx(rope.inv_freq[-1].item() / 4.0)  # slowest interpolated


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": 30}, "not divisible by n_heads"),
        ({"n_kv_heads": 3}, "not divisible by n_kv_heads"),
        ({"position": "alibi", "rope_theta": 5e5}, "rope_theta applies to position rope or yarn"),
        ({"position": "yarn"}, "needs a `yarn:` section"),
        ({"position": "rope", "yarn": {"original_max_position_embeddings": 16}}, "applies to position yarn"),
        ({"d_model": 36, "n_heads": 12, "position": "rope"}, "head dimension 3"),
        ({"activation": "gelu", "leaky_relu_slope": 0.2}, "applies to activation leaky_relu"),
    ],
)
def test_bad_specs_say_why(changes, message):
    base = {"tokenizer": "t", "d_model": 32, "n_heads": 4}
    with pytest.raises(ValueError, match=message):
        ArchSpec(**{**base, **changes})


def test_attention_kinds_and_widths():
    assert spec_for("rope", kv=4).attention_kind == "multi-head"
    assert spec_for("rope", kv=2).attention_kind == "grouped-query"
    assert spec_for("rope", kv=1).attention_kind == "multi-query"
    assert spec_for("rope", activation="swiglu").ff_width == 88  # 8/3 * 32 = 85.3 -> multiple of 8
    assert spec_for("rope", activation="gelu").ff_width == 128


def test_parameter_counts_and_flops_match_the_model(tokenizer):
    """Counts per component add up to the model's parameters; the FLOPs formula equals what
    torch's FLOP counter measures on a forward pass (matrix multiplies and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    for position, tie, kv in [("rope", True, 2), ("alibi", False, 1), ("sinusoidal", True, 4)]:
        model = build_model(spec_for(position, kv=kv, tie_embeddings=tie), tokenizer)
        counts = {c.component: c.parameters for c in count_parameters(model)}
        assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
        assert ("output head" in counts) == (not tie)
        assert counts["attention"] == 2 * 2 * (32 * 32 + 32 * 8 * kv)  # layers x (q,o + k,v)
        context = 16
        ids = torch.randint(3, 300, (1, context))
        model.set_attn_implementation("eager")  # CPU SDPA kernels are invisible to the counter
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(ids)
        assert counter.get_total_flops() / context == flops_per_token(model.config, context)


def test_build_writes_a_complete_model_folder(tokenizer, tmp_path):
    spec = spec_for("alibi", kv=2)
    out = build(spec, tmp_path / "lab", tokenizer, get_template("chatml"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "lab_arch.yaml", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    again = build_model(spec, tokenizer)  # the same seed gives the same weights
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, again(ids).logits)
    assert reloaded.config.position_type == "alibi" and reloaded.config.num_key_value_heads == 2


def test_llama_like_lab_model_equals_transformers_llama(tokenizer):
    """RoPE + RMSNorm + SwiGLU + grouped-query attention, untied, is LLaMA: with LLaMA's weights
    copied in, the lab model's logits are transformers' LlamaForCausalLM's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec_for("rope", "rmsnorm", 2, "swiglu", tie_embeddings=False, rope_theta=500000.0)
    lab = build_model(spec, tokenizer)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=lab.config.vocab_size,
            hidden_size=32,
            intermediate_size=spec.ff_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=spec.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=False,
        )
    ).eval()
    renames = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    state = {}
    for key, value in llama.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = value
    missing, unexpected = lab.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(lab(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
