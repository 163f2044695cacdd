import json

import keras_hub
import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.models.model import (
    check_adapter_model,
    enable_lora,
    load_adapter,
    recovery_format,
    save_adapter,
)
from pipeline.run.config import LoraConfig, load_config


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
    cfg = load_config(None, [f"model.preset={tiny.preset}", "train.sequence_length=256"])
    cfg.lora = lora
    save_adapter(causal_lm, cfg, path)
    assert json.loads((tmp_path / "adapter.json").read_text()) == {
        "rank": 4,
        "alpha": 16.0,
        "target_layers": ["query", "value"],
        "preset": str(tiny.preset),
        "family": "gemma",
        "dtype": cfg.model.dtype,
        "template": cfg.train.template,
        "sequence_length": 256,
        "max_response_tokens": cfg.train.max_response_tokens,
    }
    fresh = keras_hub.models.GemmaCausalLM.from_preset(str(tiny.preset), preprocessor=None)
    how, settings = load_adapter(fresh, path, f"kaggle://someone/gemma/keras/{tiny.preset.name}/2")
    np.testing.assert_allclose(np.asarray(fresh(inputs)), logits, rtol=1e-5, atol=1e-5)
    # predict formats its prompts as the adapter was trained, whatever the config says.
    said = []
    assert recovery_format(settings, load_config(None).train, said.append) == (
        cfg.train.template,
        256,
        cfg.train.max_response_tokens,
    )
    assert said == [
        "the adapter was trained with train.sequence_length 256, not the config's; using it"
    ]


def test_an_adapter_of_another_preset_or_family_is_refused_naming_both(tiny, tmp_path):
    settings = {"preset": "gemma_7b_en", "family": "gemma"}
    check_adapter_model(settings, "a.lora.h5", "kaggle://google/gemma/keras/gemma_7b_en/3", "gemma")
    check_adapter_model({}, "old.lora.h5", "gemma_2b_en", "gemma")  # from before the json said
    for preset, family in [("gemma_instruct_7b_en", "gemma"), ("mistral_7b_tiny", "mistral")]:
        with pytest.raises(
            InputError,
            match=rf"adapter a.lora.h5 was trained on gemma_7b_en \(gemma\), not on model.preset "
            rf"{preset} \({family}\); set model.preset=gemma_7b_en",
        ):
            check_adapter_model(settings, "a.lora.h5", preset, family)
