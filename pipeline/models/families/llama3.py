"""Llama 3, 3.1 and 3.2 (`Llama3Backbone`): Llama-style blocks, KerasHub's
Llama layout map, a byte-level BPE tokenizer; a request is a user header
block and `<|eot_id|>` ends the assistant's turn."""

from pipeline.models.families.family import Family, TransformersFormat
from pipeline.models.families.llama_style import (
    PROJECTIONS,
    llama_style_dimensions,
    llama_style_layout_axes,
    llama_style_transformers_weights,
    llama_style_weight_dims,
)

TRANSFORMERS = TransformersFormat(
    architecture="LlamaForCausalLM",
    weights=llama_style_transformers_weights(),
    # KerasHub's tokenizer.json lists only the tokenizer's own special tokens,
    # so other unsplittable ones (<|eot_id|>) would be split by transformers.
    tokenizer="byte_level_bpe",
    tokenizer_config={
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": None,
        "add_bos_token": True,  # as published: <|begin_of_text|> starts every text
        "model_max_length": 131072,
    },
    base_models={
        "llama3.2_instruct_1b": "meta-llama/Llama-3.2-1B-Instruct",
        "llama3.2_instruct_3b": "meta-llama/Llama-3.2-3B-Instruct",
        "llama3_instruct_8b_en": "meta-llama/Meta-Llama-3-8B-Instruct",
        "llama3.1_instruct_8b": "meta-llama/Llama-3.1-8B-Instruct",
    },
)


FAMILY = Family(
    name="llama3",
    backbone_class="Llama3Backbone",
    causal_lm_class="Llama3CausalLM",
    tokenizer_class="Llama3Tokenizer",
    lora_targets=PROJECTIONS,
    chat_turn=(
        "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    end_of_turn="<|eot_id|>",
    dimensions=llama_style_dimensions,
    weight_dims=llama_style_weight_dims(tied_by_default=False),
    layout_axes=llama_style_layout_axes,
    # As published (Hugging Face config.json).
    architectures={
        "llama3.2_1b": dict(
            vocabulary_size=128256,
            num_layers=16,
            num_query_heads=32,
            num_key_value_heads=8,
            hidden_dim=2048,
            intermediate_dim=8192,
            tie_word_embeddings=True,
        ),
        "llama3.2_3b": dict(
            vocabulary_size=128256,
            num_layers=28,
            num_query_heads=24,
            num_key_value_heads=8,
            hidden_dim=3072,
            intermediate_dim=8192,
            tie_word_embeddings=True,
        ),
        "llama3_8b": dict(
            vocabulary_size=128256,
            num_layers=32,
            num_query_heads=32,
            num_key_value_heads=8,
            hidden_dim=4096,
            intermediate_dim=14336,
        ),
    },
    tiny_config=dict(
        vocabulary_size=1024,
        num_layers=3,
        num_query_heads=8,  # 4 queries per key/value head, as Llama 3's 32 / 8
        num_key_value_heads=2,
        hidden_dim=128,
        intermediate_dim=256,
        # Untied as Llama 3 and 3.1 8B. (3.2 ties it; KerasHub 0.32's
        # LlamaBackbone.get_config leaves the flag out, so a tied model saved
        # with save_to_preset would load back untied.)
        tie_word_embeddings=False,
    ),
    presets=(
        "llama3.2_instruct_1b",
        "llama3.2_instruct_3b",
        "llama3_instruct_8b_en",
        "llama3.1_instruct_8b",
    ),
    transformers=TRANSFORMERS,
)
