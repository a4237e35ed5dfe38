"""Test and demo fixtures: tiny random models and tokenizers built offline. Not part of the
user-facing API: no run config reaches it, and its names change as the tests need.

What uses it: `lmforge quickstart` (`pipeline/quickstart.py`: `build_tiny_tokenizer`,
`build_tiny_llama`, `save_tiny`) and the test suite (`tests/conftest.py`,
`tests/tokenizer_families.py` and the tests of methods, export and inference), which builds
every other model here.

Nothing here touches a network: the tokenizer is a byte-level BPE trained with
`tokenizers` on text the caller provides, and the model is a randomly initialised
Llama (or Qwen2-VL, T5, MarianMT, BERT) built from a config. Both save in the ordinary
Hugging Face layout, so every other part of lmforge loads them exactly as it loads a hub
model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

# Special tokens of every chat template lmforge ships, so one tiny tokenizer serves
# the template tests of all of them. Each is a single token, as in the real models.
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
MASK = "<mask>"  # the encoder tokenizer's mask token (masked-LM training)
TEMPLATE_SPECIAL_TOKENS = [
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<|im_start|>",
    "<|im_end|>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
]
# Added as ordinary (non-special) tokens: they must survive `skip_special_tokens`
# decoding, because reasoning traces are shown to users.
THINK_TOKENS = ["<think>", "</think>"]


def build_tiny_tokenizer(
    corpus: Iterable[str], vocab_size: int = 512, split_words: bool = True
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus`; digits are always split one per token.

    `split_words=False` lets tokens span words and spaces (not lines), so text repeated across the
    corpus, such as a fixed tools prompt, becomes a few tokens: a model trained from scratch then
    sees short sequences."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # Lines, and a token start at every quote: a JSON call's name and values stay tokens of their own.
    lines = (
        []
        if split_words
        else [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Split('"', behavior="merged_with_next"),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *lines,
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, UNK, PAD, *TEMPLATE_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=TEMPLATE_SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(THINK_TOKENS)
    fast.model_max_length = 4096
    return fast


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for CPU tests (defaults: ~0.1M parameters + embeddings)."""
    import torch

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    """Save model (safetensors) and tokenizer side by side, like a hub checkpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_vl(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_dim: int = 32,
    vision_depth: int = 2,
    seed: int = 0,
    family: str = "qwen2_vl",
):
    """A randomly initialised Qwen2-VL (language model + vision tower + merger) for CPU tests;
    `family="qwen2_5_vl"` builds a Qwen2.5-VL (windowed vision attention, SwiGLU vision MLP).

    Images are cut into 14-pixel patches and every 2x2 patches merge into one image token, as in
    the real model; the token ids come from the tiny tokenizer's <|image_pad|> and friends.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = tokenizer.convert_tokens_to_ids
    vision = {
        "depth": vision_depth,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_5_vl":
        vision.update(
            hidden_size=vision_dim,
            intermediate_size=vision_dim * 2,
            out_hidden_size=hidden_size,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
        )
    else:
        vision.update(embed_dim=vision_dim, hidden_size=hidden_size, mlp_ratio=2)
    config_class, model_class = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[family]
    config = config_class(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads // 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<unk>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return model_class(config)


def save_tiny_vlm(
    model,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
) -> Path:
    """Save a tiny vision-language model with its tokenizer and image processor (the layout of a hub
    Qwen2-VL folder: preprocessor_config.json beside the weights)."""
    from transformers import Qwen2VLImageProcessorPil

    out_dir = save_tiny(model, tokenizer, out_dir)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    image_processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_encoder_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """The tiny tokenizer made an encoder's (RoBERTa style): a `<mask>` token, and every text
    wrapped as `<s> text </s>` (a pair as `<s> a </s> b </s>`), `<s>` serving as CLS, `</s>` as SEP."""
    fast = build_tiny_tokenizer(corpus, vocab_size)
    fast.add_special_tokens({"mask_token": MASK, "cls_token": BOS, "sep_token": EOS})
    ids = {token: fast.convert_tokens_to_ids(token) for token in (BOS, EOS)}
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=list(ids.items()),
    )
    return fast


def build_tiny_t5(
    tokenizer: PreTrainedTokenizerFast,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int | None = None,
    gated: bool = False,
    seed: int = 0,
):
    """A randomly initialised T5 (encoder-decoder; `gated=True`: T5 v1.1 / Flan-T5's gated-GELU
    feed-forward, `wi_0`/`wi_1`). As in T5, decoding starts from the pad token."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff or d_model * 2,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def build_tiny_marian(
    tokenizer: PreTrainedTokenizerFast,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
):
    """A randomly initialised MarianMT (encoder-decoder, sinusoidal positions); decoding starts from
    the pad token, as in the Opus-MT models."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=len(tokenizer),
        decoder_vocab_size=len(tokenizer),
        d_model=d_model,
        encoder_layers=num_layers,
        decoder_layers=num_layers,
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        encoder_ffn_dim=d_model * 2,
        decoder_ffn_dim=d_model * 2,
        max_position_embeddings=256,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    model.config.decoder_start_token_id = tokenizer.pad_token_id
    return model


def build_tiny_bert(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
):
    """A randomly initialised BERT with its pre-training heads, like the hub's bert-base checkpoints:
    it loads as a masked LM, or as a sequence classifier (pooler kept, a new `classifier` head). Give
    it `build_tiny_encoder_tokenizer`'s tokenizer."""
    import torch
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return BertForPreTraining(config)
