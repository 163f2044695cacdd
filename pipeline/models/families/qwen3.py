"""Qwen 3 (`Qwen3Backbone`): Llama-style blocks with query/key norms;
KerasHub has no layout map for it, so it takes Llama's. The tokenizer has
no start token; a request is a ChatML user turn with thinking switched off
(an empty `<think>` block, as Qwen's chat template writes it), and
`<|im_end|>` (the tokenizer's end token) ends the answer."""

from pipeline.models.families.family import Family, TransformersFormat
from pipeline.models.families.llama_style import (
    PROJECTIONS,
    llama_style_dimensions,
    llama_style_layout_axes,
    llama_style_transformers_weights,
    llama_style_weight_dims,
)


def qwen3_transformers_config(config):
    """Qwen3ForCausalLM's config.json (KerasHub has no Qwen 3 exporter)."""
    return {
        "model_type": "qwen3",
        "vocab_size": config["vocabulary_size"],
        "hidden_size": config["hidden_dim"],
        "intermediate_size": config["intermediate_dim"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": config["num_query_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": config["layer_norm_epsilon"],
        "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": config["rope_max_wavelength"]},
        "max_position_embeddings": 40960,
        "tie_word_embeddings": config["tie_word_embeddings"],
        "use_sliding_window": False,
        "use_cache": True,
    }


TRANSFORMERS = TransformersFormat(
    architecture="Qwen3ForCausalLM",
    weights=llama_style_transformers_weights(query_key_norms=True),
    config=qwen3_transformers_config,
    tokenizer="byte_level_bpe",
    tokenizer_config={
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 40960,
    },
    base_models={
        f"qwen3_{size}_en": f"Qwen/Qwen3-{size.upper()}"
        for size in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")
    },
)


FAMILY = Family(
    name="qwen3",
    backbone_class="Qwen3Backbone",
    causal_lm_class="Qwen3CausalLM",
    tokenizer_class="Qwen3Tokenizer",
    lora_targets=PROJECTIONS,
    chat_turn="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    end_of_turn=None,
    dimensions=llama_style_dimensions,
    weight_dims=llama_style_weight_dims(tied_by_default=True),
    layout_axes=llama_style_layout_axes,
    # As published (Hugging Face config.json).
    architectures={
        "qwen3_0.6b": dict(
            vocabulary_size=151936,
            num_layers=28,
            num_query_heads=16,
            num_key_value_heads=8,
            hidden_dim=1024,
            intermediate_dim=3072,
            head_dim=128,
            tie_word_embeddings=True,
        ),
        "qwen3_8b": dict(
            vocabulary_size=151936,
            num_layers=36,
            num_query_heads=32,
            num_key_value_heads=8,
            hidden_dim=4096,
            intermediate_dim=12288,
            head_dim=128,
            tie_word_embeddings=False,
        ),
        "qwen3_32b": dict(
            vocabulary_size=151936,
            num_layers=64,
            num_query_heads=64,
            num_key_value_heads=8,
            hidden_dim=5120,
            intermediate_dim=25600,
            head_dim=128,
            tie_word_embeddings=False,
        ),
    },
    tiny_config=dict(
        vocabulary_size=1024,
        num_layers=3,
        num_query_heads=8,  # 4 queries per key/value head, as Qwen 3 8B's 32 / 8
        num_key_value_heads=2,
        hidden_dim=128,
        intermediate_dim=256,
        head_dim=16,
        tie_word_embeddings=True,  # as Qwen 3 0.6B to 4B (8B and larger untie it)
    ),
    presets=(
        "qwen3_0.6b_en",
        "qwen3_1.7b_en",
        "qwen3_4b_en",
        "qwen3_8b_en",
        "qwen3_14b_en",
        "qwen3_32b_en",
    ),
    transformers=TRANSFORMERS,
)
