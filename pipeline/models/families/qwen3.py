"""Qwen 3 (`Qwen3Backbone`): Llama-style blocks with query/key norms;
KerasHub has no layout map for it, so it takes Llama's. The tokenizer has
no start token; a request is a ChatML user turn with thinking switched off
(an empty `<think>` block, as Qwen's chat template writes it), and
`<|im_end|>` (the tokenizer's end token) ends the answer."""

from pipeline.models.families.family import Family
from pipeline.models.families.llama_style import (
    llama_style_dimensions,
    llama_style_layout_axes,
    llama_style_weight_dims,
)


FAMILY = Family(
    name="qwen3",
    backbone_class="Qwen3Backbone",
    causal_lm_class="Qwen3CausalLM",
    tokenizer_class="Qwen3Tokenizer",
    chat_turn="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    end_of_turn=None,
    dimensions=llama_style_dimensions,
    weight_dims=llama_style_weight_dims(tied_by_default=True),
    layout_axes=llama_style_layout_axes,
    # As published (Hugging Face config.json).
    architectures={
        "qwen3_0.6b": dict(vocabulary_size=151936, num_layers=28, num_query_heads=16, num_key_value_heads=8,
                           hidden_dim=1024, intermediate_dim=3072, head_dim=128, tie_word_embeddings=True),
        "qwen3_8b": dict(vocabulary_size=151936, num_layers=36, num_query_heads=32, num_key_value_heads=8,
                         hidden_dim=4096, intermediate_dim=12288, head_dim=128, tie_word_embeddings=False),
        "qwen3_32b": dict(vocabulary_size=151936, num_layers=64, num_query_heads=64, num_key_value_heads=8,
                          hidden_dim=5120, intermediate_dim=25600, head_dim=128, tie_word_embeddings=False),
    },
    tiny_config=dict(vocabulary_size=1024, num_layers=2, num_query_heads=8, num_key_value_heads=8, hidden_dim=128,
                     intermediate_dim=256, head_dim=16, tie_word_embeddings=True),
    presets=("qwen3_0.6b_en", "qwen3_1.7b_en", "qwen3_4b_en", "qwen3_8b_en", "qwen3_14b_en", "qwen3_32b_en"),
)
