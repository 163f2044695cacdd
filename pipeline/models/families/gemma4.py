"""Gemma 4 (`Gemma4Backbone`), dense, text only.

Every Gemma 4 preset carries vision (and, E2B and E4B, audio) towers; the
pipeline loads its text decoder alone (`text_only_config`). Its blocks
carry Gemma's names but differ from layer to layer, which `gemma4_layers`
spells out as `Gemma4Backbone` builds them: global layers have wider heads
(`global_head_dim`) and, on the 31B, fewer key/value heads whose key
projection is also the value (`num_global_key_value_heads`); the last
`num_kv_shared_layers` blocks reuse an earlier block's keys and values, so
have no key/value projections, and a wider feed-forward on E2B
(`use_double_wide_mlp`); E2B and E4B add per-layer token embeddings (PLE).
The backbone takes `position_ids`. The mixture-of-experts preset (26B A4B)
is refused: its expert bank has no layout here.
"""

from pipeline.errors import InputError
from pipeline.models.families.family import Dimensions, Family, TransformersFormat
from pipeline.models.families.gemma import PROJECTIONS, gemma_layout_axes

CHAT_TURN = "<|turn>user\n{content}<turn|>\n<|turn>model\n"
END_OF_TURN = "<turn|>"


def gemma4_layers(config):
    """[{global, kv_shared, head_dim, key_value_heads, value, ffw_dim} of
    each block], as `Gemma4Backbone` builds them (`value`: whether the block
    has its own value projection)."""
    n = config["num_layers"]
    pattern = config.get("sliding_window_pattern", 6)
    layer_types = config.get("layer_types") or [
        "full_attention" if i % pattern == pattern - 1 else "sliding_attention" for i in range(n)
    ]
    first_shared = n - (config.get("num_kv_shared_layers") or 0)
    global_kv = config.get("num_global_key_value_heads")
    layers = []
    for i, layer_type in enumerate(layer_types):
        is_global = layer_type == "full_attention"
        shared = i >= first_shared
        keys_are_values = is_global and global_kv is not None
        layers.append(
            dict(
                is_global=is_global,
                kv_shared=shared,
                head_dim=(config.get("global_head_dim") or config["head_dim"])
                if is_global
                else config["head_dim"],
                key_value_heads=global_kv if keys_are_values else config["num_key_value_heads"],
                value=not keys_are_values,
                ffw_dim=config["intermediate_dim"]
                * (2 if shared and config.get("use_double_wide_mlp") else 1),
            )
        )
    return layers


def gemma4_dimensions(config):
    """The widest block's sizes (KerasHub's cache holds every layer at the
    widest head size)."""
    layers = gemma4_layers(config)
    return Dimensions(
        config["vocabulary_size"],
        config["num_layers"],
        config["num_query_heads"],
        config["num_key_value_heads"],
        config["hidden_dim"],
        max(lay["head_dim"] for lay in layers),
        max(lay["ffw_dim"] for lay in layers),
    )


def gemma4_cache_shapes(config):
    """Each block's own key/value cache: none for a block that reads an
    earlier one's, the global blocks' with their own heads and head size."""
    return [
        None if layer["kv_shared"] else (layer["key_value_heads"], layer["head_dim"])
        for layer in gemma4_layers(config)
    ]


def gemma4_block_kinds(config):
    """(global, kv_shared) of each block: what its weights, cache and work
    depend on."""
    return [(layer["is_global"], layer["kv_shared"]) for layer in gemma4_layers(config)]


def gemma4_cut(config, kinds):
    """The config of a Gemma 4 of blocks of `kinds` ((global, kv_shared)
    each, the shared ones last as in the model: each reads the keys and
    values of the last earlier block of its type with its own)."""
    return dict(
        config,
        num_layers=len(kinds),
        layer_types=[
            "full_attention" if is_global else "sliding_attention" for is_global, _ in kinds
        ],
        num_kv_shared_layers=sum(shared for _, shared in kinds),
    )


def gemma4_weight_dims(config):
    hidden = ("hidden_dim", config["hidden_dim"])
    query = ("num_query_heads", config["num_query_heads"])
    weights = {
        "token_embedding/embeddings": [("vocabulary_size", config["vocabulary_size"]), hidden]
    }
    per_layer = config.get("hidden_size_per_layer_input") or 0
    if per_layer:
        width = ("num_layers x hidden_size_per_layer_input", config["num_layers"] * per_layer)
        weights["per_layer_token_embedding/embeddings"] = [
            (
                "vocab_size_per_layer_input",
                config.get("vocab_size_per_layer_input") or config["vocabulary_size"],
            ),
            width,
        ]
        weights["per_layer_model_projection/kernel"] = [hidden, width]
    for i, layer in enumerate(gemma4_layers(config)):
        block = f"decoder_block_{i}"
        head = (
            "global_head_dim"
            if layer["is_global"] and config.get("global_head_dim")
            else "head_dim",
            layer["head_dim"],
        )
        kv = (
            "num_global_key_value_heads" if not layer["value"] else "num_key_value_heads",
            layer["key_value_heads"],
        )
        ffw = (
            "intermediate_dim x 2"
            if layer["ffw_dim"] != config["intermediate_dim"]
            else "intermediate_dim",
            layer["ffw_dim"],
        )
        weights[f"{block}/attention/query/kernel"] = [query, hidden, head]
        if not layer["kv_shared"]:
            weights[f"{block}/attention/key/kernel"] = [kv, hidden, head]
            if layer["value"]:
                weights[f"{block}/attention/value/kernel"] = [kv, hidden, head]
        weights.update(
            {
                f"{block}/attention/attention_output/kernel": [query, head, hidden],
                f"{block}/ffw_gating/kernel": [hidden, ffw],
                f"{block}/ffw_gating_2/kernel": [hidden, ffw],
                f"{block}/ffw_linear/kernel": [ffw, hidden],
            }
        )
        if per_layer:
            weights[f"{block}/per_layer_input_gate/kernel"] = [
                hidden,
                ("hidden_size_per_layer_input", per_layer),
            ]
            weights[f"{block}/per_layer_up_proj/kernel"] = [
                ("hidden_size_per_layer_input", per_layer),
                hidden,
            ]
    return weights


def gemma4_layout_axes(data_axis="batch", model_axis="model"):
    """Gemma's layout map, with the per-layer embedding table and its
    projection sharded as the token embedding and a gating kernel (the
    per-block PLE kernels are small and stay whole)."""
    return {
        **gemma_layout_axes(data_axis, model_axis),
        "per_layer_token_embedding/embeddings": (model_axis, data_axis),
        "per_layer_model_projection/kernel": (data_axis, model_axis),
    }


def check_dense_text_model(config):
    if config.get("enable_moe_block"):
        raise InputError(
            "this Gemma 4 preset is the mixture-of-experts one (26B A4B), whose expert bank the "
            "pipeline does "
            "not shard; take a dense one: gemma4_instruct_2b, gemma4_instruct_4b or "
            "gemma4_instruct_31b"
        )
    if config.get("is_embedding_model"):
        raise InputError(
            "this Gemma 4 preset is an embedding model, which does not generate; take an instruct "
            "one"
        )


def gemma4_transformers_config(config):
    """Gemma4ForCausalLM's config.json (text only). KerasHub's exporter
    leaves out `attention_k_eq_v`, so transformers would give the 31B's
    global layers a value projection of their own, and the rope types."""
    layers = gemma4_layers(config)
    return {
        "model_type": "gemma4_text",
        "vocab_size": config["vocabulary_size"],
        "hidden_size": config["hidden_dim"],
        "intermediate_size": config["intermediate_dim"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": config["num_query_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "global_head_dim": config.get("global_head_dim") or config["head_dim"],
        "attention_k_eq_v": config.get("num_global_key_value_heads") is not None,
        "num_global_key_value_heads": config.get("num_global_key_value_heads"),
        "layer_types": [
            "full_attention" if layer["is_global"] else "sliding_attention" for layer in layers
        ],
        "sliding_window": config["sliding_window_size"],
        "num_kv_shared_layers": config.get("num_kv_shared_layers", 0),
        "hidden_size_per_layer_input": config.get("hidden_size_per_layer_input", 0),
        "vocab_size_per_layer_input": config.get("vocab_size_per_layer_input")
        or config["vocabulary_size"],
        "use_double_wide_mlp": config.get("use_double_wide_mlp", False),
        "enable_moe_block": False,
        "final_logit_softcapping": config.get("final_logit_soft_cap"),
        "attn_logit_softcapping": config.get("attention_logit_soft_cap"),
        "rms_norm_eps": config.get("layer_norm_epsilon", 1e-6),
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "full_attention": {
                "rope_type": "proportional",
                "rope_theta": config.get("global_rope_wavelength") or 1e6,
                "partial_rotary_factor": config.get("global_rope_partial_rotary_factor", 1.0),
            },
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": config.get("local_rope_wavelength") or 1e4,
            },
        },
        "attention_bias": False,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "use_cache": True,
        "pad_token_id": 0,
    }


BLOCK = "model.layers.{i}"
TRANSFORMERS = TransformersFormat(
    architecture="Gemma4ForCausalLM",
    config=gemma4_transformers_config,
    weights=(
        ("token_embedding/embeddings", "model.embed_tokens.weight", "copy"),
        ("per_layer_token_embedding/embeddings", "model.embed_tokens_per_layer.weight", "copy"),
        (
            "per_layer_model_projection/kernel",
            "model.per_layer_model_projection.weight",
            "transpose",
        ),
        ("per_layer_projection_norm/scale", "model.per_layer_projection_norm.weight", "copy"),
        ("decoder_block_{i}/layer_scalar", f"{BLOCK}.layer_scalar", "scalar"),
        ("decoder_block_{i}/pre_attention_norm/scale", f"{BLOCK}.input_layernorm.weight", "copy"),
        (
            "decoder_block_{i}/post_attention_norm/scale",
            f"{BLOCK}.post_attention_layernorm.weight",
            "copy",
        ),
        (
            "decoder_block_{i}/attention/query/kernel",
            f"{BLOCK}.self_attn.q_proj.weight",
            "heads_first",
        ),
        (
            "decoder_block_{i}/attention/key/kernel",
            f"{BLOCK}.self_attn.k_proj.weight",
            "heads_first",
        ),
        (
            "decoder_block_{i}/attention/value/kernel",
            f"{BLOCK}.self_attn.v_proj.weight",
            "heads_first",
        ),
        (
            "decoder_block_{i}/attention/query_norm/scale",
            f"{BLOCK}.self_attn.q_norm.weight",
            "copy",
        ),
        ("decoder_block_{i}/attention/key_norm/scale", f"{BLOCK}.self_attn.k_norm.weight", "copy"),
        (
            "decoder_block_{i}/attention/attention_output/kernel",
            f"{BLOCK}.self_attn.o_proj.weight",
            "output",
        ),
        (
            "decoder_block_{i}/pre_ffw_norm/scale",
            f"{BLOCK}.pre_feedforward_layernorm.weight",
            "copy",
        ),
        (
            "decoder_block_{i}/post_ffw_norm/scale",
            f"{BLOCK}.post_feedforward_layernorm.weight",
            "copy",
        ),
        ("decoder_block_{i}/ffw_gating/kernel", f"{BLOCK}.mlp.gate_proj.weight", "transpose"),
        ("decoder_block_{i}/ffw_gating_2/kernel", f"{BLOCK}.mlp.up_proj.weight", "transpose"),
        ("decoder_block_{i}/ffw_linear/kernel", f"{BLOCK}.mlp.down_proj.weight", "transpose"),
        (
            "decoder_block_{i}/per_layer_input_gate/kernel",
            f"{BLOCK}.per_layer_input_gate.weight",
            "transpose",
        ),
        (
            "decoder_block_{i}/per_layer_up_proj/kernel",
            f"{BLOCK}.per_layer_projection.weight",
            "transpose",
        ),
        (
            "decoder_block_{i}/post_per_layer_input_norm/scale",
            f"{BLOCK}.post_per_layer_input_norm.weight",
            "copy",
        ),
        ("final_normalization/scale", "model.norm.weight", "copy"),
    ),
    base_models={
        "gemma4_instruct_2b": "google/gemma-4-E2B-it",
        "gemma4_instruct_4b": "google/gemma-4-E4B-it",
        "gemma4_instruct_31b": "google/gemma-4-31B-it",
    },
)

# What every Gemma 4 text decoder sets (KerasHub's defaults differ).
GEMMA4_TEXT = dict(
    image_size=None,
    vision_encoder=None,
    audio_encoder=None,
    final_logit_soft_cap=30.0,
    sliding_window_size=512,
    global_head_dim=512,
    global_rope_partial_rotary_factor=0.25,
)

FAMILY = Family(
    name="gemma4",
    backbone_class="Gemma4Backbone",
    causal_lm_class="Gemma4CausalLM",
    tokenizer_class="Gemma4Tokenizer",
    lora_targets=PROJECTIONS,  # not the per-layer embedding's projections
    chat_turn=CHAT_TURN,
    end_of_turn=END_OF_TURN,
    dimensions=gemma4_dimensions,
    weight_dims=gemma4_weight_dims,
    cache_shapes=gemma4_cache_shapes,
    block_kinds=gemma4_block_kinds,
    cut_blocks=gemma4_cut,
    layout_axes=gemma4_layout_axes,
    # As published (Hugging Face config.json, text part).
    architectures={
        "gemma4_2b": dict(
            GEMMA4_TEXT,
            vocabulary_size=262144,
            num_layers=35,
            num_query_heads=8,
            num_key_value_heads=1,
            hidden_dim=1536,
            intermediate_dim=6144,
            head_dim=256,
            layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7,
            num_kv_shared_layers=20,
            hidden_size_per_layer_input=256,
            use_double_wide_mlp=True,
        ),
        "gemma4_4b": dict(
            GEMMA4_TEXT,
            vocabulary_size=262144,
            num_layers=42,
            num_query_heads=8,
            num_key_value_heads=2,
            hidden_dim=2560,
            intermediate_dim=10240,
            head_dim=256,
            num_kv_shared_layers=18,
            hidden_size_per_layer_input=256,
        ),
        "gemma4_31b": dict(
            GEMMA4_TEXT,
            vocabulary_size=262144,
            num_layers=60,
            num_query_heads=32,
            num_key_value_heads=16,
            hidden_dim=5376,
            intermediate_dim=21504,
            head_dim=256,
            num_global_key_value_heads=4,
        ),
    },
    # Every kind of block: local and global, own and shared keys/values,
    # keys as values on the global ones, per-layer embeddings, a double-wide
    # feed-forward on the shared ones.
    tiny_config=dict(
        GEMMA4_TEXT,
        vocabulary_size=1024,
        num_layers=4,
        num_query_heads=16,  # grouped-query attention; the mesh shards the 8 key/value heads
        num_key_value_heads=8,
        hidden_dim=128,
        intermediate_dim=256,
        head_dim=16,
        global_head_dim=32,
        sliding_window_size=32,  # shorter than the stages' prompts
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2,
        num_global_key_value_heads=8,
        hidden_size_per_layer_input=8,
        use_double_wide_mlp=True,
    ),
    presets=("gemma4_instruct_2b", "gemma4_instruct_4b", "gemma4_instruct_31b"),
    transformers=TRANSFORMERS,
    check_config=check_dense_text_model,
    text_only_config=dict(vision_encoder=None, audio_encoder=None),
    position_ids=True,
)
