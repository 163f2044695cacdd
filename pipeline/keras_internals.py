"""Every private Keras, KerasHub and JAX name the pipeline uses, behind one door.

Private names change without notice between releases, so this module checks
the installed versions when it is imported and refuses others with a
message naming the supported ones (the pins in requirements-*.txt). Nothing
else in `pipeline/` touches a `_private` Keras name or a `keras.src` /
`keras_hub.src` module, or reads an attribute of a layer that KerasHub does
not export (its decoder blocks and attention layers: `gemma_blocks` reads
them here). Import it after `runtime.setup_environment`.

Example:
```python
from pipeline import keras_internals
keras_internals.reset_seed(0)
config = keras_internals.read_preset_json("gemma_instruct_7b_en")
for block in keras_internals.gemma_blocks(causal_lm.backbone):
    block.query, block.logit_soft_cap  # the query projection, the attention's soft cap
```
"""

import dataclasses

import keras
import keras_hub

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
class GemmaBlock:
    """The parts of a KerasHub `GemmaDecoderBlock` that a decoder runs, and
    the settings of its attention: its layers' attributes are KerasHub's
    internals, read here only. The projections carry the names of
    `model.PROJECTIONS` (the names `lora.target_layers` matches)."""

    attention: object  # the attention layer, for `apply_rope` and `sliding_window_mask`
    pre_attention_norm: object
    query: object
    key: object
    value: object
    attention_output: object
    post_attention_norm: object  # None where the block has none (Gemma 1)
    pre_ffw_norm: object
    ffw_gating: object
    ffw_gating_2: object
    ffw_linear: object
    post_ffw_norm: object  # None where the block has none (Gemma 1)
    query_scale_dim: int  # queries are scaled by 1 / sqrt(query_scale_dim)
    logit_soft_cap: object  # float, or None for no cap
    sliding_window: bool


def gemma_blocks(backbone):
    """The `GemmaBlock` of every decoder block of a `GemmaBackbone`, in order."""
    blocks = []
    for block in backbone.transformer_layers:
        attention = block.attention
        blocks.append(
            GemmaBlock(
                attention=attention,
                pre_attention_norm=block.pre_attention_norm,
                query=attention.query_dense,
                key=attention.key_dense,
                value=attention.value_dense,
                attention_output=attention.output_dense,
                post_attention_norm=block.post_attention_norm
                if block.use_post_attention_norm
                else None,
                pre_ffw_norm=block.pre_ffw_norm,
                ffw_gating=block.gating_ffw,
                ffw_gating_2=block.gating_ffw_2,
                ffw_linear=block.ffw_linear,
                post_ffw_norm=block.post_ffw_norm if block.use_post_ffw_norm else None,
                query_scale_dim=(
                    attention.head_dim
                    if attention.query_head_dim_normalize
                    else attention.hidden_dim // attention.num_query_heads
                ),
                logit_soft_cap=attention.logit_soft_cap,
                sliding_window=attention.use_sliding_window_attention,
            )
        )
    return blocks


def gemma_final_norm(backbone):
    """The `GemmaBackbone`'s norm after its last block."""
    return backbone.layer_norm


def apply_rope(attention, x, start_index):
    """`GemmaAttention`'s rotary embedding of `x` at positions from `start_index`."""
    return attention._apply_rope(x, start_index)


def sliding_window_mask(attention, mask, start_index):
    """`GemmaAttention`'s attention mask limited to its sliding window."""
    return attention._mask_sliding_window(mask, cache_update_index=start_index)


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
