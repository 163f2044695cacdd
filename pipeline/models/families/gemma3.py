"""Gemma 3 (`Gemma3Backbone`), text only.

Its blocks carry the names of Gemma's (so Gemma's layout map reads them),
with query/key norms and local/global RoPE inside the attention; its
`intermediate_dim` is the width of each gating projection. A preset with a
vision tower is refused: every size with one has a `_text` preset.
"""

from pipeline.errors import InputError
from pipeline.models.families.family import Family, TransformersFormat
from pipeline.models.families.gemma import (
    CHAT_TURN,
    END_OF_TURN,
    PROJECTIONS,
    gemma_dimensions,
    gemma_layout_axes,
    gemma_transformers_weights,
    gemma_weight_dims,
)


def gemma3_dimensions(config):
    return gemma_dimensions(config, ffw_dim=config["intermediate_dim"])


def gemma3_weight_dims(config):
    return gemma_weight_dims(config, gemma3_dimensions(config))


def check_text_only(config):
    if config.get("vision_encoder"):
        raise InputError(
            "this Gemma 3 preset has a vision tower, which prompt recovery does not use; take the "
            "same size's text-only preset (e.g. gemma3_instruct_4b_text for gemma3_instruct_4b)"
        )


TRANSFORMERS = TransformersFormat(
    architecture="Gemma3ForCausalLM",
    weights=gemma_transformers_weights("pre_feedforward_layernorm")
    + (
        (
            "decoder_block_{i}/attention/query_norm/scale",
            "model.layers.{i}.self_attn.q_norm.weight",
            "copy",
        ),
        (
            "decoder_block_{i}/attention/key_norm/scale",
            "model.layers.{i}.self_attn.k_norm.weight",
            "copy",
        ),
        (
            "decoder_block_{i}/post_attention_norm/scale",
            "model.layers.{i}.post_attention_layernorm.weight",
            "copy",
        ),
        (
            "decoder_block_{i}/post_ffw_norm/scale",
            "model.layers.{i}.post_feedforward_layernorm.weight",
            "copy",
        ),
    ),
    base_models={
        f"gemma3_instruct_{size}": f"google/gemma-3-{size.removesuffix('_text')}-it"
        for size in ("270m", "1b", "4b_text", "12b_text", "27b_text")
    },
)

# What every Gemma 3 text model sets (KerasHub's defaults differ).
GEMMA3_TEXT = dict(
    image_size=None,
    vision_encoder=None,
    query_head_dim_normalize=True,
    use_query_key_norm=True,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    use_sliding_window_attention=True,
    sliding_window_size=1024,
    local_rope_scaling_factor=1.0,
    global_rope_scaling_factor=1.0,
)

FAMILY = Family(
    name="gemma3",
    backbone_class="Gemma3Backbone",
    causal_lm_class="Gemma3CausalLM",
    tokenizer_class="Gemma3Tokenizer",
    lora_targets=PROJECTIONS,
    chat_turn=CHAT_TURN,
    end_of_turn=END_OF_TURN,
    dimensions=gemma3_dimensions,
    weight_dims=gemma3_weight_dims,
    layout_axes=gemma_layout_axes,
    # As published (Hugging Face config.json, text part).
    architectures={
        "gemma3_1b": dict(
            GEMMA3_TEXT,
            vocabulary_size=262144,
            num_layers=26,
            num_query_heads=4,
            num_key_value_heads=1,
            hidden_dim=1152,
            intermediate_dim=6912,
            head_dim=256,
            sliding_window_size=512,
        ),
        "gemma3_4b": dict(
            GEMMA3_TEXT,
            vocabulary_size=262144,
            num_layers=34,
            num_query_heads=8,
            num_key_value_heads=4,
            hidden_dim=2560,
            intermediate_dim=10240,
            head_dim=256,
            global_rope_scaling_factor=8.0,
        ),
        "gemma3_12b": dict(
            GEMMA3_TEXT,
            vocabulary_size=262144,
            num_layers=48,
            num_query_heads=16,
            num_key_value_heads=8,
            hidden_dim=3840,
            intermediate_dim=15360,
            head_dim=256,
            global_rope_scaling_factor=8.0,
        ),
        # Queries scaled by hidden / heads (168), not head_dim.
        "gemma3_27b": dict(
            GEMMA3_TEXT,
            vocabulary_size=262144,
            num_layers=62,
            num_query_heads=32,
            num_key_value_heads=16,
            hidden_dim=5376,
            intermediate_dim=21504,
            head_dim=128,
            global_rope_scaling_factor=8.0,
            query_head_dim_normalize=False,
        ),
    },
    tiny_config=dict(
        GEMMA3_TEXT,
        vocabulary_size=1024,
        num_layers=6,  # five local layers, then a global one, as in every Gemma 3
        num_query_heads=16,  # 16 / 8 as the 12B's (the mesh shards the 8)
        num_key_value_heads=8,
        hidden_dim=128,
        intermediate_dim=256,
        head_dim=16,
        sliding_window_size=32,  # shorter than the stages' prompts
    ),
    presets=(
        "gemma3_instruct_270m",
        "gemma3_instruct_1b",
        "gemma3_instruct_4b_text",
        "gemma3_instruct_12b_text",
        "gemma3_instruct_27b_text",
    ),
    transformers=TRANSFORMERS,
    check_config=check_text_only,
)
