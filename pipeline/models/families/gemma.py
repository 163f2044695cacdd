"""Gemma 1, 1.1 and 2 (`GemmaBackbone`), the reference notebooks' family.

Gemma's `intermediate_dim` is the width of both gating projections
together.
"""

from pipeline.models.families.family import Dimensions, Family, TransformersFormat

CHAT_TURN = "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
END_OF_TURN = "<end_of_turn>"
# A block's projections, by their KerasHub layer names (Gemma 3 and 4 name theirs the same).
PROJECTIONS = (
    "query",
    "key",
    "value",
    "attention_output",
    "ffw_gating",
    "ffw_gating_2",
    "ffw_linear",
)


def gemma_dimensions(config, ffw_dim=None):
    return Dimensions(
        config["vocabulary_size"],
        config["num_layers"],
        config["num_query_heads"],
        config["num_key_value_heads"],
        config["hidden_dim"],
        config["head_dim"],
        ffw_dim or config["intermediate_dim"] // 2,
    )


def gemma_weight_dims(config, dims=None):
    """Gemma's matrices, block by block (Gemma 3 names its own the same way)."""
    dims = dims or gemma_dimensions(config)
    hidden = ("hidden_dim", dims.hidden_dim)
    ffw = (
        "intermediate_dim / 2"
        if dims.ffw_dim != config["intermediate_dim"]
        else "intermediate_dim",
        dims.ffw_dim,
    )
    head = ("head_dim", dims.head_dim)
    query = ("num_query_heads", dims.num_query_heads)
    kv = ("num_key_value_heads", dims.num_key_value_heads)
    weights = {"token_embedding/embeddings": [("vocabulary_size", dims.vocabulary_size), hidden]}
    for i in range(dims.num_layers):
        block = f"decoder_block_{i}"
        weights.update(
            {
                f"{block}/attention/query/kernel": [query, hidden, head],
                f"{block}/attention/key/kernel": [kv, hidden, head],
                f"{block}/attention/value/kernel": [kv, hidden, head],
                f"{block}/attention/attention_output/kernel": [query, head, hidden],
                f"{block}/ffw_gating/kernel": [hidden, ffw],
                f"{block}/ffw_gating_2/kernel": [hidden, ffw],
                f"{block}/ffw_linear/kernel": [ffw, hidden],
            }
        )
    return weights


def gemma_layout_axes(data_axis="batch", model_axis="model"):
    """KerasHub's Gemma layout map (GemmaBackbone.get_layout_map) as plain
    data; a test pins it to KerasHub's."""
    return {
        "token_embedding/embeddings": (model_axis, data_axis),
        "decoder_block.*attention.*(query|key|value).kernel": (model_axis, data_axis, None),
        "decoder_block.*attention_output.kernel": (model_axis, None, data_axis),
        "decoder_block.*ffw_gating.kernel": (data_axis, model_axis),
        "decoder_block.*ffw_gating_2.kernel": (data_axis, model_axis),
        "decoder_block.*ffw_linear.kernel": (model_axis, data_axis),
    }


def gemma_transformers_weights(feed_forward_norm):
    """Gemma's weights in transformers (Gemma 3 adds its own norms);
    `feed_forward_norm` is transformers' name for the norm before the
    feed-forward (Gemma 1 calls it post_attention_layernorm)."""
    block = "model.layers.{i}"
    return (
        ("token_embedding/embeddings", "model.embed_tokens.weight", "copy"),
        ("decoder_block_{i}/pre_attention_norm/scale", f"{block}.input_layernorm.weight", "copy"),
        (
            "decoder_block_{i}/attention/query/kernel",
            f"{block}.self_attn.q_proj.weight",
            "heads_first",
        ),
        (
            "decoder_block_{i}/attention/key/kernel",
            f"{block}.self_attn.k_proj.weight",
            "heads_first",
        ),
        (
            "decoder_block_{i}/attention/value/kernel",
            f"{block}.self_attn.v_proj.weight",
            "heads_first",
        ),
        (
            "decoder_block_{i}/attention/attention_output/kernel",
            f"{block}.self_attn.o_proj.weight",
            "output",
        ),
        ("decoder_block_{i}/pre_ffw_norm/scale", f"{block}.{feed_forward_norm}.weight", "copy"),
        ("decoder_block_{i}/ffw_gating/kernel", f"{block}.mlp.gate_proj.weight", "transpose"),
        ("decoder_block_{i}/ffw_gating_2/kernel", f"{block}.mlp.up_proj.weight", "transpose"),
        ("decoder_block_{i}/ffw_linear/kernel", f"{block}.mlp.down_proj.weight", "transpose"),
        ("final_normalization/scale", "model.norm.weight", "copy"),
    )


TRANSFORMERS = TransformersFormat(
    architecture="GemmaForCausalLM",
    weights=gemma_transformers_weights("post_attention_layernorm"),
    base_models={
        "gemma_2b_en": "google/gemma-2b",
        "gemma_instruct_2b_en": "google/gemma-2b-it",
        "gemma_7b_en": "google/gemma-7b",
        "gemma_instruct_7b_en": "google/gemma-7b-it",
        "gemma_1.1_instruct_2b_en": "google/gemma-1.1-2b-it",
        "gemma_1.1_instruct_7b_en": "google/gemma-1.1-7b-it",
    },
)


def gemma2_transformers_config(config):
    """Gemma2ForCausalLM's config.json (KerasHub's exporter writes Gemma 2
    as Gemma 1: no post norms, soft caps or sliding window). Queries are
    scaled by head_dim whatever `query_head_dim_normalize` says: KerasHub's
    Gemma block builds its attention so (keras-hub 0.32), and the export
    gives the model that was trained (Gemma 2 27B's own scalar is 144)."""
    sliding = config.get("use_sliding_window_attention", False)
    return {
        "model_type": "gemma2",
        "vocab_size": config["vocabulary_size"],
        "hidden_size": config["hidden_dim"],
        "intermediate_size": config["intermediate_dim"] // 2,
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": config["num_query_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": config.get("layer_norm_epsilon", 1e-6),
        "query_pre_attn_scalar": config["head_dim"],
        "attn_logit_softcapping": config.get("attention_logit_soft_cap"),
        "final_logit_softcapping": config.get("final_logit_soft_cap"),
        "sliding_window": config.get("sliding_window_size", 4096),
        "layer_types": [
            "sliding_attention" if sliding and i % 2 == 0 else "full_attention"
            for i in range(config["num_layers"])
        ],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "use_cache": True,
        "pad_token_id": 0,
    }


GEMMA2_TRANSFORMERS = TransformersFormat(
    architecture="Gemma2ForCausalLM",
    weights=gemma_transformers_weights("pre_feedforward_layernorm")
    + (
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
    config=gemma2_transformers_config,
    base_models={
        f"gemma2_{kind}{size}_en": f"google/gemma-2-{size}{'-it' if kind else ''}"
        for kind in ("", "instruct_")
        for size in ("2b", "9b", "27b")
    },
)


def gemma_transformers_format(config):
    """Gemma 2 (its post norms) in its own transformers class, Gemma 1 and 1.1 in Gemma's."""
    return GEMMA2_TRANSFORMERS if config.get("use_post_attention_norm") else TRANSFORMERS


FAMILY = Family(
    name="gemma",
    backbone_class="GemmaBackbone",
    causal_lm_class="GemmaCausalLM",
    tokenizer_class="GemmaTokenizer",
    lora_targets=PROJECTIONS,
    chat_turn=CHAT_TURN,
    end_of_turn=END_OF_TURN,
    dimensions=gemma_dimensions,
    weight_dims=gemma_weight_dims,
    layout_axes=gemma_layout_axes,
    # KerasHub's preset configs.
    architectures={
        "gemma_2b": dict(
            vocabulary_size=256000,
            num_layers=18,
            num_query_heads=8,
            num_key_value_heads=1,
            hidden_dim=2048,
            intermediate_dim=32768,
            head_dim=256,
        ),
        "gemma_7b": dict(
            vocabulary_size=256000,
            num_layers=28,
            num_query_heads=16,
            num_key_value_heads=16,
            hidden_dim=3072,
            intermediate_dim=49152,
            head_dim=256,
        ),
    },
    # Gemma 1's block (the default preset's); Gemma 1 has no sliding window.
    tiny_config=dict(
        vocabulary_size=1024,
        num_layers=3,
        num_query_heads=16,  # 16 / 8 as Gemma 2 9B's (the mesh shards the 8)
        num_key_value_heads=8,
        hidden_dim=128,
        intermediate_dim=512,
        head_dim=16,
    ),
    presets=(
        "gemma_instruct_2b_en",
        "gemma_instruct_7b_en",
        "gemma_1.1_instruct_7b_en",
        "gemma2_instruct_2b_en",
        "gemma2_instruct_9b_en",
        "gemma2_instruct_27b_en",
    ),
    transformers=TRANSFORMERS,
    transformers_variant=gemma_transformers_format,
)
