"""Mistral (`MistralBackbone`): the 1st and 3rd places' model
(Mistral-7B-Instruct-v0.2). Llama-style blocks with a sliding window;
KerasHub has no layout map for it, so it takes Llama's. A request is one
`[INST]` turn; `</s>` ends the answer."""

from pipeline.models.families.family import Family, TransformersFormat
from pipeline.models.families.llama_style import (
    PROJECTIONS,
    llama_style_dimensions,
    llama_style_layout_axes,
    llama_style_transformers_weights,
    llama_style_weight_dims,
)

MISTRAL_7B = dict(
    vocabulary_size=32000,
    num_layers=32,
    num_query_heads=32,
    num_key_value_heads=8,
    hidden_dim=4096,
    intermediate_dim=14336,
)

TRANSFORMERS = TransformersFormat(
    architecture="MistralForCausalLM",
    weights=llama_style_transformers_weights(),
    base_models={
        "mistral_instruct_7b_en": "mistralai/Mistral-7B-Instruct-v0.1",
        "mistral_0.2_instruct_7b_en": "mistralai/Mistral-7B-Instruct-v0.2",
        "mistral_0.3_instruct_7b_en": "mistralai/Mistral-7B-Instruct-v0.3",
    },
)


FAMILY = Family(
    name="mistral",
    backbone_class="MistralBackbone",
    causal_lm_class="MistralCausalLM",
    tokenizer_class="MistralTokenizer",
    lora_targets=PROJECTIONS,
    chat_turn="[INST] {content} [/INST]",
    end_of_turn=None,
    dimensions=llama_style_dimensions,
    weight_dims=llama_style_weight_dims(tied_by_default=False),
    layout_axes=llama_style_layout_axes,
    # As published (Hugging Face config.json); v0.3 has 32768 pieces.
    architectures={
        "mistral_7b": MISTRAL_7B,
        "mistral_0.3_7b": dict(MISTRAL_7B, vocabulary_size=32768),
    },
    tiny_config=dict(
        vocabulary_size=1024,
        num_layers=3,
        num_query_heads=8,  # 4 queries per key/value head, as Mistral 7B's 32 / 8
        num_key_value_heads=2,
        hidden_dim=128,
        intermediate_dim=256,
        sliding_window=32,  # shorter than the stages' prompts, as v0.1's 4,096 is than long ones
    ),
    presets=("mistral_instruct_7b_en", "mistral_0.2_instruct_7b_en", "mistral_0.3_instruct_7b_en"),
    transformers=TRANSFORMERS,
)
