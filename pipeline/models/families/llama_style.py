"""The decoder block Mistral, Llama 3 and Qwen 3 share in KerasHub
(`transformer_layer_<i>/self_attention/...`, gate/up/down feed-forward):
its weights and its layout map, the one KerasHub's `LlamaBackbone` has,
plus the untied output embedding, sharded like the input one."""

from pipeline.models.families.family import Dimensions

# A block's projections, by their KerasHub layer names.
PROJECTIONS = (
    "query",
    "key",
    "value",
    "attention_output",
    "feedforward_gate_dense",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
)


def llama_style_dimensions(config):
    head_dim = config.get("head_dim") or config["hidden_dim"] // config["num_query_heads"]
    return Dimensions(
        config["vocabulary_size"],
        config["num_layers"],
        config["num_query_heads"],
        config["num_key_value_heads"],
        config["hidden_dim"],
        head_dim,
        config["intermediate_dim"],
    )


def llama_style_weight_dims(tied_by_default):
    """config -> weight dims, the output embedding tied to the input one as
    the config's `tie_word_embeddings` says (`tied_by_default` where it says
    nothing, as Mistral's)."""
    return lambda config: _weight_dims(config, config.get("tie_word_embeddings", tied_by_default))


def _weight_dims(config, tied_embeddings):
    dims = llama_style_dimensions(config)
    hidden = ("hidden_dim", dims.hidden_dim)
    vocabulary = ("vocabulary_size", dims.vocabulary_size)
    ffw = ("intermediate_dim", dims.ffw_dim)
    head = ("head_dim", dims.head_dim)
    query = ("num_query_heads", dims.num_query_heads)
    kv = ("num_key_value_heads", dims.num_key_value_heads)
    weights = {"token_embedding/embeddings": [vocabulary, hidden]}
    if not tied_embeddings:
        weights["token_embedding/reverse_embeddings"] = [hidden, vocabulary]
    for i in range(dims.num_layers):
        block = f"transformer_layer_{i}"
        weights.update(
            {
                f"{block}/self_attention/query/kernel": [hidden, query, head],
                f"{block}/self_attention/key/kernel": [hidden, kv, head],
                f"{block}/self_attention/value/kernel": [hidden, kv, head],
                f"{block}/self_attention/attention_output/kernel": [query, head, hidden],
                f"{block}/feedforward_gate_dense/kernel": [hidden, ffw],
                f"{block}/feedforward_intermediate_dense/kernel": [hidden, ffw],
                f"{block}/feedforward_output_dense/kernel": [ffw, hidden],
            }
        )
    return weights


def llama_style_layout_axes(data_axis="batch", model_axis="model"):
    """KerasHub's `LlamaBackbone.get_layout_map` as plain data (a test pins
    it), with the untied output embedding."""
    return {
        "token_embedding/embeddings": (model_axis, data_axis),
        "token_embedding/reverse_embeddings": (data_axis, model_axis),
        "transformer_layer.*self_attention.*(query|key|value).kernel": (
            model_axis,
            data_axis,
            None,
        ),
        "transformer_layer.*attention_output.kernel": (model_axis, None, data_axis),
        "transformer_layer.*feedforward_intermediate_dense.kernel": (data_axis, model_axis),
        "transformer_layer.*feedforward_gate_dense.kernel": (data_axis, model_axis),
        "transformer_layer.*feedforward_output_dense.kernel": (model_axis, data_axis),
    }


def llama_style_transformers_weights(query_key_norms=False):
    """The block's weights in transformers (Qwen 3 adds query/key norms);
    the untied output embedding is transformers' `lm_head`."""
    block = "model.layers.{i}"
    attention = "transformer_layer_{i}/self_attention"
    weights = (
        ("token_embedding/embeddings", "model.embed_tokens.weight", "copy"),
        ("token_embedding/reverse_embeddings", "lm_head.weight", "transpose"),
        (
            "transformer_layer_{i}/self_attention_layernorm/scale",
            f"{block}.input_layernorm.weight",
            "copy",
        ),
        (f"{attention}/query/kernel", f"{block}.self_attn.q_proj.weight", "hidden_first"),
        (f"{attention}/key/kernel", f"{block}.self_attn.k_proj.weight", "hidden_first"),
        (f"{attention}/value/kernel", f"{block}.self_attn.v_proj.weight", "hidden_first"),
        (f"{attention}/attention_output/kernel", f"{block}.self_attn.o_proj.weight", "output"),
        (
            "transformer_layer_{i}/feedforward_layernorm/scale",
            f"{block}.post_attention_layernorm.weight",
            "copy",
        ),
        (
            "transformer_layer_{i}/feedforward_gate_dense/kernel",
            f"{block}.mlp.gate_proj.weight",
            "transpose",
        ),
        (
            "transformer_layer_{i}/feedforward_intermediate_dense/kernel",
            f"{block}.mlp.up_proj.weight",
            "transpose",
        ),
        (
            "transformer_layer_{i}/feedforward_output_dense/kernel",
            f"{block}.mlp.down_proj.weight",
            "transpose",
        ),
        ("sequence_output_layernorm/scale", "model.norm.weight", "copy"),
    )
    if query_key_norms:
        weights += (
            (
                f"{attention}/query_dense_layernorm/scale",
                f"{block}.self_attn.q_norm.weight",
                "copy",
            ),
            (f"{attention}/key_dense_layernorm/scale", f"{block}.self_attn.k_norm.weight", "copy"),
        )
    return weights
