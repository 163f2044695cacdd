import json

import keras_hub
import numpy as np

from pipeline.models.model import enable_lora, load_adapter, save_adapter
from pipeline.run.config import LoraConfig


def _random_lora(causal_lm, seed):
    rng = np.random.default_rng(seed)
    for variable in causal_lm.trainable_variables:
        variable.assign(rng.normal(scale=0.3, size=variable.shape).astype("float32"))


def test_lora_scale_is_alpha_over_rank_and_survives_the_adapter_round_trip(
    tiny, tiny_model, tmp_path
):
    lora = LoraConfig(rank=4, alpha=16.0, target_layers=["query", "value"])
    causal_lm = keras_hub.models.GemmaCausalLM.from_preset(str(tiny.preset), preprocessor=None)
    enabled = enable_lora(causal_lm, lora)
    _random_lora(causal_lm, 0)
    for layer in enabled:
        delta = np.tensordot(
            np.asarray(layer.lora_kernel_a.value), np.asarray(layer.lora_kernel_b.value), axes=1
        )
        np.testing.assert_allclose(
            np.asarray(layer.kernel),
            np.asarray(layer._kernel.value) + 4.0 * delta,
            rtol=1e-5,
            atol=1e-5,
        )
    inputs = {
        "token_ids": np.arange(2, 34, dtype="int32").reshape(2, 16),
        "padding_mask": np.ones((2, 16), bool),
    }
    logits = np.asarray(causal_lm(inputs))

    path = tmp_path / "adapter.lora.h5"
    save_adapter(causal_lm, lora, path)
    assert json.loads((tmp_path / "adapter.json").read_text()) == {
        "rank": 4,
        "alpha": 16.0,
        "target_layers": ["query", "value"],
    }
    fresh = keras_hub.models.GemmaCausalLM.from_preset(str(tiny.preset), preprocessor=None)
    load_adapter(fresh, path)
    np.testing.assert_allclose(np.asarray(fresh(inputs)), logits, rtol=1e-5, atol=1e-5)
