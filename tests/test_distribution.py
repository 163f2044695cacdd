import keras
import keras_hub
import pytest
from specs import GEMMA_7B, GEMMA_TINY

from pipeline.models.families import gemma
from pipeline.models.families.gemma import gemma_layout_axes
from pipeline.models.model import enable_lora, model_distribution
from pipeline.models.tiny import BACKBONE_CONFIG
from pipeline.parallel.distribution import (
    DistributionError,
    check_batch_sizes,
    check_mesh,
    check_shardable,
)
from pipeline.run.config import DistributionConfig, LoraConfig

# Expected PartitionSpec of every Gemma weight on the (1, 8) ("batch",
# "model") mesh; LoRA factors are sharded like the kernel they adapt.
EXPECTED_SPECS = {
    "token_embedding/embeddings": ("model", "batch"),
    "attention/query/kernel": ("model", "batch", None),
    "attention/key/kernel": ("model", "batch", None),
    "attention/value/kernel": ("model", "batch", None),
    "attention/attention_output/kernel": ("model", None, "batch"),
    "ffw_gating/kernel": ("batch", "model"),
    "ffw_gating_2/kernel": ("batch", "model"),
    "ffw_linear/kernel": ("model", "batch"),
    "query/lora_kernel_a": ("model", "batch", None),
    "value/lora_kernel_a": ("model", "batch", None),
    "query/lora_kernel_b": (None, None),
    "value/lora_kernel_b": (None, None),
    "ffw_gating/lora_kernel_a": ("batch", None),
    "ffw_gating/lora_kernel_b": (None, "model"),
    "ffw_linear/lora_kernel_a": ("model", None),
    "ffw_linear/lora_kernel_b": (None, "batch"),
    "scale": (),
}

V38 = dict(mesh_shape=[1, 8], axis_names=["batch", "model"])
LAYOUT = gemma_layout_axes("batch", "model")


def _expected(path):
    for suffix, spec in EXPECTED_SPECS.items():
        if path.endswith(suffix):
            return spec
    raise AssertionError(f"no expectation for {path}")


def test_every_weight_sharded_as_on_tpu_v3_8(tiny):
    distribution = model_distribution(DistributionConfig(**V38), GEMMA_TINY, [8])
    assert isinstance(distribution, keras.distribution.ModelParallel)
    with distribution.scope():
        causal_lm = keras_hub.models.GemmaCausalLM.from_preset(str(tiny.preset), preprocessor=None)
        enable_lora(
            causal_lm,
            LoraConfig(rank=4, target_layers=["query", "value", "ffw_gating", "ffw_linear"]),
        )
    weights = causal_lm.backbone.weights
    assert any("lora_kernel_a" in w.path for w in weights)
    for w in weights:
        spec = tuple(w.value.sharding.spec)
        expected = _expected(w.path)
        # A trailing None and an omitted axis mean the same: not sharded.
        assert spec + (None,) * (len(expected) - len(spec)) == expected or (
            not expected and all(a is None for a in spec)
        ), (w.path, spec)
        if "model" in expected:
            assert len(w.value.sharding.device_set) == 8


def test_model_axis_of_one_is_data_parallel():
    distribution = model_distribution(
        DistributionConfig(mesh_shape=[8, 1], axis_names=["batch", "model"]), GEMMA_TINY, [8]
    )
    assert isinstance(distribution, keras.distribution.DataParallel)


def test_mesh_must_match_device_count():
    with pytest.raises(
        DistributionError,
        match=r"needs 16 devices but 8 are visible; set distribution.mesh_shape=\[1,8\]",
    ):
        check_mesh([2, 8], ["batch", "model"], 8)
    check_mesh([1, 8], ["batch", "model"], 8)


def test_batch_must_divide_data_axis():
    with pytest.raises(DistributionError, match="batch size 3 does not divide by the data axis"):
        check_batch_sizes([2, 4], [4, 3])
    with pytest.raises(DistributionError, match="batch size 3 does not divide by the data axis"):
        model_distribution(DistributionConfig(mesh_shape=[2, 4]), GEMMA_TINY, [4, 3])


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocabulary_size", 1020),
        ("num_query_heads", 6),
        ("num_key_value_heads", 1),
        ("intermediate_dim", 200),
    ],
)
def test_unshardable_dimension_named_before_loading(field, value):
    config = dict(BACKBONE_CONFIG, **{field: value})
    with pytest.raises(
        DistributionError,
        match=rf"{field.split('_dim')[0]}.*does not divide by the 'model' mesh axis \(8\)",
    ):
        check_shardable(LAYOUT, gemma.gemma_weight_dims(config), [1, 8], ["batch", "model"])


def test_hidden_dim_checked_against_the_data_axis():
    config = dict(BACKBONE_CONFIG, hidden_dim=130)
    with pytest.raises(DistributionError, match="hidden_dim=130 .* 'batch' mesh axis"):
        check_shardable(LAYOUT, gemma.gemma_weight_dims(config), [4, 2], ["batch", "model"])


def test_gemma_2b_kv_heads_cannot_be_split_on_v3_8():
    gemma_2b = gemma.FAMILY.architectures["gemma_2b"]
    with pytest.raises(DistributionError, match="num_key_value_heads=1"):
        check_shardable(LAYOUT, gemma.gemma_weight_dims(gemma_2b), [1, 8], ["batch", "model"])
    check_shardable(LAYOUT, GEMMA_7B.weight_dims(), [1, 8], ["batch", "model"])


def test_layout_as_data_is_kerashubs(tiny):
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ["data", "shard"], keras.distribution.list_devices()
    )
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh, "shard", "data")
    assert {k: tuple(layout_map[k].axes) for k in layout_map} == gemma_layout_axes("data", "shard")
