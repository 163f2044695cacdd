import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from specs import GEMMA_7B, GEMMA_TINY

from pipeline.models.families.family import ModelSpec
from pipeline.models.families.gemma import gemma_layout_axes
from pipeline.models.families.registry import FAMILIES
from pipeline.models.memory import (
    DTYPE_BYTES,
    LORA_DTYPE_BYTES,
    activation_bytes_per_row,
    decoder_kernel_copy_bytes,
    frozen_weight_bytes,
    kv_cache_bytes,
    logits_rows_per_row,
    lora_parameter_count,
    plan_memory,
    prompt_pass_bytes,
)
from pipeline.models.model import enable_lora, model_distribution
from pipeline.run.config import DistributionConfig, LoraConfig, load_config


def test_lora_count_matches_kaggles_gemma_7b_guide():
    # Kaggle's distributed-tuning guide: rank 4 on query/value, 11.1M trainable.
    assert (
        lora_parameter_count(GEMMA_7B, LoraConfig(rank=4, target_layers=["query", "value"]))
        == 11_067_392
    )


def test_per_device_weights_match_the_sharded_model(tiny_model):
    causal_lm, _ = tiny_model
    on_device_0 = sum(
        w.value.addressable_shards[0].data.nbytes
        for w in causal_lm.backbone.weights
        if "lora" not in w.path
    )
    estimate = frozen_weight_bytes(GEMMA_TINY, gemma_layout_axes(), {"batch": 1, "model": 8}, 4)
    assert estimate == on_device_0


def test_lora_share_of_one_device_is_sharded_like_the_kernels():
    lora = LoraConfig(rank=4)
    whole = lora_parameter_count(GEMMA_7B, lora)
    on_one_core = lora_parameter_count(
        GEMMA_7B, lora, gemma_layout_axes(), {"batch": 1, "model": 8}
    )
    # Every A factor is sharded 8 ways; of the B factors only the
    # feed-forward ones (rank x ffw) are, the rest (rank x head_dim or hidden) are replicated.
    assert whole / 8 < on_one_core < whole / 4


@pytest.mark.parametrize(
    "mesh_shape, dtype",
    [([1, 8], "float32"), ([8, 1], "float32"), ([2, 4], "float32"), ([1, 8], "bfloat16")],
    ids=["model-parallel", "data-parallel", "pod", "model-parallel-bfloat16"],
)
def test_plan_agrees_with_xlas_compiled_memory_analysis(tiny, mesh_shape, dtype):
    """The train step's gradient program, per device: XLA's argument bytes
    are the weights (+ the token ids), its temporaries the activations."""
    import keras_hub

    distribution = model_distribution(DistributionConfig(mesh_shape=mesh_shape), GEMMA_TINY, [8])
    with distribution.scope():
        causal_lm = keras_hub.models.GemmaCausalLM.from_preset(
            str(tiny.preset), preprocessor=None, dtype=dtype
        )
        lora = LoraConfig(rank=8)
        enable_lora(causal_lm, lora)
    batch, length = 8, 256
    data_axis, model_axis = mesh_shape

    def loss(trainable, frozen, ids):
        inputs = {"token_ids": ids, "padding_mask": jnp.ones_like(ids, bool)}
        logits, _ = causal_lm.stateless_call(trainable, frozen, inputs)
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(ids, logits, from_logits=True)
        )

    trainable = [v.value for v in causal_lm.trainable_variables]
    frozen = [v.value for v in causal_lm.non_trainable_variables]
    ids = jax.device_put(
        jnp.ones((batch, length), jnp.int32),
        distribution.get_data_layout((batch, length)).backend_layout,
    )
    stats = (
        jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen, ids).compile().memory_analysis()
    )

    layout = gemma_layout_axes() if model_axis > 1 else {}
    axis_size = {"batch": data_axis, "model": model_axis}
    weights = frozen_weight_bytes(GEMMA_TINY, layout, axis_size, DTYPE_BYTES[dtype])
    weights += lora_parameter_count(GEMMA_TINY, lora, layout, axis_size) * LORA_DTYPE_BYTES
    ids_per_device = ids.nbytes / data_axis
    assert weights + ids_per_device == pytest.approx(stats.argument_size_in_bytes, rel=0.01)
    logits_rows = logits_rows_per_row(GEMMA_TINY, layout, axis_size, "batch")
    activations = (
        batch
        / data_axis
        * activation_bytes_per_row(GEMMA_TINY, length, model_axis, DTYPE_BYTES[dtype], logits_rows)
    )
    assert 0.5 < activations / stats.temp_size_in_bytes < 2.0


@pytest.mark.parametrize(
    "mesh_shape, targets", [([1, 8], "all"), ([2, 4], "attention"), ([1, 8], "none")]
)
def test_generation_plan_agrees_with_xlas_memory_analysis_of_the_decoder(tiny, mesh_shape, targets):
    """The decoding program of one call, per device: XLA's argument bytes are
    the weights and the adapter (+ the prompts), its temporaries the
    decoder's kernel copies and the KV cache."""
    import keras_hub

    from pipeline.models.decoding import CachedDecoder

    lora = LoraConfig(
        rank=8,
        target_layers={
            "all": None,  # the default: the family's seven projections
            "none": [],
            "attention": ["query", "key", "value", "attention_output"],
        }[targets],
    )
    distribution = model_distribution(DistributionConfig(mesh_shape=mesh_shape), GEMMA_TINY, [8])
    with distribution.scope():
        causal_lm = keras_hub.models.GemmaCausalLM.from_preset(
            str(tiny.preset), preprocessor=None, dtype="float32"
        )
        if targets != "none":
            enable_lora(causal_lm, lora)
        batch, length, new_tokens = 8, 320, 64
        ids, mask = (
            np.ones((batch, length), "int32"),
            np.ones((batch, length), bool),
        )  # rows over the data axis
        stats = (
            CachedDecoder(causal_lm, stop_token_ids=[1])
            .lower(ids, mask, new_tokens)
            .compile()
            .memory_analysis()
        )

    data_axis, model_axis = mesh_shape
    layout, axis_size = gemma_layout_axes(), {"batch": data_axis, "model": model_axis}
    weights = frozen_weight_bytes(GEMMA_TINY, layout, axis_size, 4)
    if targets != "none":
        weights += lora_parameter_count(GEMMA_TINY, lora, layout, axis_size) * LORA_DTYPE_BYTES
    prompts = (ids.nbytes + mask.nbytes) / data_axis
    assert weights + prompts == pytest.approx(stats.argument_size_in_bytes, rel=0.01)
    adapted = GEMMA_TINY.lora_targets(lora.target_layers) if targets != "none" else []
    copies = decoder_kernel_copy_bytes(GEMMA_TINY, layout, axis_size, 4, adapted)
    cache = kv_cache_bytes(GEMMA_TINY, batch // data_axis, length, model_axis, 4)
    prompt_pass = prompt_pass_bytes(
        GEMMA_TINY, batch // data_axis, length - new_tokens, model_axis, 4
    )
    # The plan is close, and above where it is off by more than the
    # decoding loop's small buffers (the plan check's 15%).
    assert 0.5 < stats.temp_size_in_bytes / (copies + cache + prompt_pass) < 1.15


def test_lora_state_is_priced_in_float32_whatever_the_model_dtype():
    plans = {
        dtype: plan_memory(
            load_config("configs/kaggle_tpu_v3_8.yaml", [f"model.dtype={dtype}"]), GEMMA_7B
        )
        for dtype in ("bfloat16", "float32")
    }
    cfg = load_config("configs/kaggle_tpu_v3_8.yaml")
    on_one_core = lora_parameter_count(
        GEMMA_7B, cfg.lora, gemma_layout_axes(), {"batch": 1, "model": 8}
    )
    # weights, gradients and two AdamW moments, float32 each
    assert plans["bfloat16"].lora_state == plans["float32"].lora_state == 4 * on_one_core * 4
    assert plans["float32"].frozen == 2 * plans["bfloat16"].frozen


def test_plan_says_when_it_does_not_fit_and_what_to_change():
    cfg = load_config("configs/kaggle_tpu_v3_8.yaml")
    plan = plan_memory(cfg, GEMMA_7B)
    assert plan.fits(plan.training) and plan.fits(plan.generation) and not plan.suggestions
    cfg = load_config(
        "configs/kaggle_tpu_v3_8.yaml", ["train.batch_size=64", "train.sequence_length=1024"]
    )
    plan = plan_memory(cfg, GEMMA_7B)
    assert not plan.fits(plan.training)
    suggested = int(plan.suggestions[0].split("=")[1].split()[0])
    smaller = plan_memory(
        load_config(
            "configs/kaggle_tpu_v3_8.yaml",
            [f"train.batch_size={suggested}", "train.sequence_length=1024"],
        ),
        GEMMA_7B,
    )
    assert smaller.fits(smaller.training) and 1 <= suggested < 64
    unsharded = plan_memory(
        load_config(
            "configs/kaggle_tpu_v3_8.yaml", ["distribution.mesh_shape=[8,1]", "train.batch_size=8"]
        ),
        GEMMA_7B,
    )
    assert "the weights alone do not fit" in unsharded.suggestions[0]
    assert "does NOT fit" in unsharded.report()


@pytest.mark.parametrize("name", ["kaggle_gpu_t4x2", "kaggle_tpu_v5e_8", "kaggle_tpu_v6e_8"])
def test_kaggle_targets_hold_gemma_7b_and_pass_the_distribution_checks(name):
    from pipeline.parallel.distribution import check_batch_sizes, check_shardable

    cfg = load_config(f"configs/{name}.yaml")
    plan = plan_memory(cfg, GEMMA_7B)
    assert plan.fits(plan.training) and plan.fits(plan.generation), plan.report()
    mesh, axes = cfg.distribution.mesh_shape, cfg.distribution.axis_names
    check_shardable(gemma_layout_axes(*axes), GEMMA_7B.weight_dims(), mesh, axes)
    check_batch_sizes(mesh, [cfg.train.batch_size, cfg.predict.batch_size, cfg.data.batch_size])


def test_one_16_gb_gpu_cannot_hold_gemma_7b_in_16_bits():
    """Why there is no P100 config: one 16 GB card, float16, no sharding."""
    cfg = load_config("configs/kaggle_gpu_t4x2.yaml", ["distribution.mesh_shape=[1,1]"])
    plan = plan_memory(cfg, GEMMA_7B, device_gib=16.0)
    assert not plan.fits(plan.generation)
    assert plan.suggestions == [
        "the weights alone do not fit: shard over more devices (a larger model axis in "
        "distribution.mesh_shape)"
    ]


def test_two_gpu_mesh_refused_where_it_cannot_work():
    from pipeline.parallel.distribution import DistributionError, check_mesh, check_shardable

    cfg = load_config("configs/kaggle_gpu_t4x2.yaml")
    with pytest.raises(DistributionError, match=r"needs 2 devices but 1 are visible"):
        check_mesh(cfg.distribution.mesh_shape, cfg.distribution.axis_names, 1)
    with pytest.raises(
        DistributionError,
        match=r"vocabulary_size=256000 of the model does not divide by the 'model' mesh axis \(3\)",
    ):
        check_shardable(gemma_layout_axes(), GEMMA_7B.weight_dims(), [1, 3], ["batch", "model"])


def test_the_decoder_copies_only_the_kernels_it_lays_out_or_merges_into():
    """Gemma's query, key and value kernels are stored heads first, so
    `CachedDecoder` holds them again hidden first; Mistral's are hidden first
    already, and only an adapted kernel is copied (merged)."""
    mistral = ModelSpec(FAMILIES["mistral"], FAMILIES["mistral"].tiny_config)
    one_device = {"batch": 1, "model": 1}

    def kernel_bytes(spec, *names):
        return 4 * sum(
            np.prod([size for _, size in dims])
            for path, dims in spec.weight_dims().items()
            if path.split("/")[-2] in names
        )

    def copies(spec, targets):
        layout = spec.family.layout_axes("batch", "model")
        return decoder_kernel_copy_bytes(spec, layout, one_device, 4, targets)

    assert copies(GEMMA_TINY, []) == kernel_bytes(GEMMA_TINY, "query", "key", "value") > 0
    assert copies(mistral, []) == 0
    assert copies(mistral, ["query", "feedforward_gate_dense"]) == kernel_bytes(
        mistral, "query", "feedforward_gate_dense"
    )
