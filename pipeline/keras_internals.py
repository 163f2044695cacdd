"""Every private Keras, KerasHub and JAX name the pipeline uses, behind one door.

Private names change without notice between releases, so this module checks
the installed versions when it is imported and refuses others with a
message naming the supported ones (the pins in requirements-*.txt). Nothing
else in `pipeline/` touches a `_private` Keras name or a `keras.src` /
`keras_hub.src` module, or reads an attribute of a layer that KerasHub does
not export (its decoder blocks and attention layers: `decoder_model` reads
them here). Import it after `runtime.setup_environment`.

Example:
```python
from pipeline import keras_internals
keras_internals.reset_seed(0)
config = keras_internals.read_preset_json("gemma_instruct_7b_en")
for block in keras_internals.decoder_model(causal_lm.backbone).blocks:
    block.query, block.logit_soft_cap  # the query projection, the attention's soft cap
```
"""

import dataclasses

import keras
import keras_hub
import numpy as np

SUPPORTED_VERSIONS = {"keras": "3.15.", "keras-hub": "0.32."}


def check_versions(installed):
    """installed: {"keras": version, "keras-hub": version}."""
    wrong = [
        f"{name} {installed[name]}"
        for name, prefix in SUPPORTED_VERSIONS.items()
        if not installed[name].startswith(prefix)
    ]
    if wrong:
        supported = " and ".join(f"{name} {prefix}x" for name, prefix in SUPPORTED_VERSIONS.items())
        raise ImportError(
            f"pipeline/keras_internals.py supports {supported} (the pins in requirements-*.txt); "
            f"found {', '.join(wrong)}. Install the pinned versions, or port the private names "
            "used there to the new release"
        )


check_versions({"keras": keras.__version__, "keras-hub": keras_hub.__version__})


def reset_seed(seed):
    """Seeds Keras' global generator (layer initialisers, `keras.random`)
    without `tf.random.set_seed` (see `runtime.set_seed`)."""
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED

    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)  # rebuilt from the seed


def initialize_distribution(job_addresses, num_processes, process_id, shutdown_timeout_seconds):
    """`keras.distribution.initialize`, with JAX's shutdown timeout (how
    long a finished process waits for the others), which Keras does not
    pass on: JAX's `jax.distributed.initialize` is bound to it while Keras
    calls it."""
    import functools

    import jax

    initialize = jax.distributed.initialize
    jax.distributed.initialize = functools.partial(
        initialize, shutdown_timeout_seconds=shutdown_timeout_seconds
    )
    try:
        keras.distribution.initialize(
            job_addresses=job_addresses, num_processes=num_processes, process_id=process_id
        )
    finally:
        jax.distributed.initialize = initialize


def wait_at_pod_barrier(name, timeout_seconds):
    """Blocks until every process of the pod reaches the barrier `name`
    (JAX's coordination service; no device collective, so no collective
    timeout)."""
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, int(timeout_seconds * 1000))


def read_preset_json(preset):
    """A preset's config.json (name, kaggle:// handle or folder), without
    its weights; KerasHub has no public loader for it."""
    from keras_hub.src.utils.preset_utils import load_json

    return load_json(str(preset))


def load_backbone(preset, backbone_class, dtype, **config_overrides):
    """The preset's backbone built from its config with `config_overrides`
    (e.g. a tower left out), then the weights it has read from the preset;
    `from_preset` passes no config override on to the backbone."""
    from keras_hub.src.utils.preset_utils import get_preset_loader

    return get_preset_loader(str(preset)).load_backbone(
        backbone_class, True, dtype=dtype, **config_overrides
    )


def lora_layers(backbone):
    """{index: layer} of the backbone's LoRA-enabled layers, indexed as
    `save_lora_weights` / `load_lora_weights` index them."""
    layers = [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]
    return {index: layers[index] for index in getattr(backbone, "_lora_enabled_layers", [])}


def write_lora_file(path, rank, factors):
    """The `.lora.h5` file `Backbone.load_lora_weights` reads, from numpy
    values: factors is {layer index: (lora_kernel_a, lora_kernel_b)}."""
    from keras.src.saving.saving_lib import H5IOStore

    store = H5IOStore(str(path), mode="w")
    store.make("lora")["rank"] = rank
    for index, (kernel_a, kernel_b) in factors.items():
        inner = store.make(f"lora/{index}")
        inner["lora_kernel_a"] = kernel_a
        inner["lora_kernel_b"] = kernel_b
    store.close()


def build_metrics(model, x, y, sample_weight):
    """Builds a compiled model's loss and metrics for batches like (x, y,
    sample_weight) (numpy), as `fit` does before its first step, without
    running the model: `train_step` then has every variable it updates."""
    model._symbolic_build(data_batch=(x, y, sample_weight))


def lora_rank(backbone):
    return backbone._lora_rank


@dataclasses.dataclass(frozen=True)
class DecoderBlock:
    """The parts of a KerasHub decoder block that a decoder runs, and the
    settings of its attention: its layers' attributes are KerasHub's
    internals, read here only. The projections carry the names of
    `model.PROJECTIONS` (the names `lora.target_layers` matches in Gemma),
    whatever the family calls them: `ffw_gating` is the activated gate,
    `ffw_gating_2` the one it multiplies, `ffw_linear` the way down. `key`
    and `value` are None in a block that reads another's keys and values
    (`kv_source`); `value` alone is None where the key projection, before
    its norm and rope, is also the value (Gemma 4 31B's global blocks)."""

    pre_attention_norm: object
    query: object
    key: object
    value: object
    attention_output: object
    post_attention_norm: object  # None where the block has none (Gemma 1, Llama)
    pre_ffw_norm: object
    ffw_gating: object
    ffw_gating_2: object
    ffw_linear: object
    post_ffw_norm: object  # None where the block has none
    query_norm: object  # per-head norms after the projections (Gemma 3, Qwen 3), else None
    key_norm: object
    rope: object  # (x, start index) -> x rotated as the block's attention rotates it
    query_scale: float  # queries are multiplied by it before the product with the keys
    logit_soft_cap: object  # float, or None for no cap
    sliding_window: object  # keys at most this many positions back (int), or None
    gate_activation: object  # applied to `ffw_gating`'s output
    value_norm: object = None  # applied to the values (Gemma 4), else None
    # The block whose keys and values this one attends to, instead of its own
    # (Gemma 4's last blocks have no key or value projection), else None.
    kv_source: object = None
    per_layer_gate: object = None  # (gate, up projection, norm) of a per-layer input, else None
    output_scale: object = None  # what the block's output is multiplied by (Gemma 4), else None


@dataclasses.dataclass(frozen=True)
class DecoderModel:
    """A backbone as a decoder runs it: its blocks in order, the norm after
    them, and the factor the token embeddings are multiplied by."""

    blocks: list
    final_norm: object
    embedding_scale: float
    per_layer_inputs: object = None  # `PerLayerInputs` (Gemma 4 E2B, E4B), else None


@dataclasses.dataclass(frozen=True)
class PerLayerInputs:
    """Gemma 4's per-layer inputs: for every token and block, `width`
    numbers from a table looked up by token id, added to a projection of
    the scaled token embedding (each block's slice normalized)."""

    table: object  # Embedding: token id -> num_layers x width
    projection: object  # Dense: scaled embedding -> num_layers x width
    norm: object  # applied to each block's slice of the projection
    width: int


def decoder_model(backbone):
    """The `DecoderModel` of a Gemma, Gemma 3, Gemma 4 (dense), Mistral,
    Llama or Qwen 3 backbone; another family's raises `NotImplementedError`."""
    readers = {
        "GemmaDecoderBlock": _gemma_block,
        "Gemma3DecoderBlock": _gemma_block,
        "Gemma4TextDecoderBlock": _gemma4_block,
        "MistralTransformerDecoder": _llama_block,
        "LlamaTransformerDecoder": _llama_block,
        "Qwen3TransformerDecoder": _llama_block,
    }
    kind = type(backbone.transformer_layers[0]).__name__
    if kind not in readers or getattr(backbone.transformer_layers[0], "enable_moe_block", False):
        raise NotImplementedError(f"no decoder reads KerasHub's {kind} blocks")
    scaled = kind.startswith("Gemma")  # Gemma multiplies embeddings by sqrt(hidden_dim)
    width = getattr(backbone, "hidden_size_per_layer_input", 0)
    return DecoderModel(
        blocks=[readers[kind](block) for block in backbone.transformer_layers],
        final_norm=backbone.layer_norm,
        embedding_scale=float(np.sqrt(np.float32(backbone.hidden_dim))) if scaled else 1.0,
        per_layer_inputs=PerLayerInputs(
            table=backbone.per_layer_token_embedding,
            projection=backbone.per_layer_model_projection,
            norm=backbone.per_layer_projection_norm,
            width=width,
        )
        if width
        else None,
    )


def _gemma_parts(block):
    """The parts every Gemma block (1 to 4) has under the same names."""
    attention = block.attention
    return dict(
        pre_attention_norm=block.pre_attention_norm,
        query=attention.query_dense,
        key=attention.key_dense,
        value=attention.value_dense,
        attention_output=attention.output_dense,
        pre_ffw_norm=block.pre_ffw_norm,
        ffw_gating=block.gating_ffw,
        ffw_gating_2=block.gating_ffw_2,
        ffw_linear=block.ffw_linear,
        rope=attention._apply_rope,
        logit_soft_cap=attention.logit_soft_cap,
        sliding_window=(
            attention.sliding_window_size if attention.use_sliding_window_attention else None
        ),
        gate_activation=lambda x: keras.activations.gelu(x, approximate=True),
    )


def _gemma_block(block):
    attention = block.attention
    query_key_norm = getattr(attention, "use_query_key_norm", False)
    scale_dim = (
        attention.head_dim
        if attention.query_head_dim_normalize
        else attention.hidden_dim // attention.num_query_heads
    )
    return DecoderBlock(
        **_gemma_parts(block),
        post_attention_norm=block.post_attention_norm if block.use_post_attention_norm else None,
        post_ffw_norm=block.post_ffw_norm if block.use_post_ffw_norm else None,
        query_norm=attention.query_norm if query_key_norm else None,
        key_norm=attention.key_norm if query_key_norm else None,
        query_scale=1 / np.sqrt(scale_dim),
    )


def _gemma4_block(block):
    """Gemma 4's text block: Gemma 3's parts, with queries left unscaled (their
    norm scales them), a norm on the values, and what differs from block to
    block (`DecoderBlock`: `kv_source`, `per_layer_gate`, `output_scale`)."""
    attention = block.attention
    return DecoderBlock(
        **_gemma_parts(block),
        post_attention_norm=block.post_attention_norm,
        post_ffw_norm=block.post_ffw_norm,
        query_norm=attention.query_norm,
        key_norm=attention.key_norm,
        query_scale=1.0,
        value_norm=attention.value_norm,
        kv_source=block.kv_shared_layer_index if block.is_kv_shared_layer else None,
        per_layer_gate=(
            (block.per_layer_input_gate, block.per_layer_up_proj, block.post_per_layer_input_norm)
            if block.hidden_size_per_layer_input
            else None
        ),
        output_scale=block.layer_scalar,
    )


def _llama_block(block):
    """Mistral's, Llama's and Qwen 3's blocks: the same parts under other
    names; the gate's activation runs in float32, as KerasHub runs it."""
    attention = block._self_attention_layer
    rotary = attention.rotary_embedding_layer
    window = getattr(block, "sliding_window", None) or getattr(
        attention, "sliding_window_size", None
    )
    activation = block.activation
    return DecoderBlock(
        pre_attention_norm=block._self_attention_layernorm,
        query=attention._query_dense,
        key=attention._key_dense,
        value=attention._value_dense,
        attention_output=attention._output_dense,
        post_attention_norm=None,
        pre_ffw_norm=block._feedforward_layernorm,
        ffw_gating=block._feedforward_gate_dense,
        ffw_gating_2=block._feedforward_intermediate_dense,
        ffw_linear=block._feedforward_output_dense,
        post_ffw_norm=None,
        query_norm=getattr(attention, "_query_dense_layer_norm", None),
        key_norm=getattr(attention, "_key_dense_layer_norm", None),
        rope=lambda x, start: rotary(x, start_index=start),
        query_scale=attention._inv_norm_factor,
        logit_soft_cap=None,
        sliding_window=window,
        gate_activation=lambda x: keras.ops.cast(activation(keras.ops.cast(x, "float32")), x.dtype),
    )


def keras_hub_transformers_config(backbone):
    """KerasHub's transformers config.json of a backbone (its exporter's;
    `pipeline.stages.export` names the weights itself)."""
    from keras_hub.src.utils.transformers.export import hf_exporter

    return dict(hf_exporter.MODEL_CONFIGS[type(backbone).__name__](backbone))


def export_keras_hub_tokenizer(tokenizer, folder):
    """KerasHub's transformers export of a SentencePiece tokenizer
    (tokenizer.model and tokenizer_config.json)."""
    from keras_hub.src.utils.transformers.export import hf_exporter

    hf_exporter.export_tokenizer(tokenizer, folder)


def bpe_split_pattern():
    """The regex `BytePairTokenizer` splits text with before BPE."""
    from keras_hub.src.tokenizers.byte_pair_tokenizer import SPLIT_PATTERN_TOKENIZERS

    return SPLIT_PATTERN_TOKENIZERS
