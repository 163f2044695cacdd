"""Export to Hugging Face transformers (and PEFT), loaded back with
transformers on the CPU: same logits and same greedy tokens as Keras."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.models.families.registry import FAMILIES
from pipeline.stages.export import (
    hf_weight,
    peft_factors,
    run_export_stage,
    write_peft_adapter,
    write_transformers_weights,
)

LOGIT_TOLERANCE = 1e-4  # float32, both sides; measured about 1e-5


def keras_logits(causal_lm, token_ids):
    from pipeline.models.model import family_of, forward_inputs

    ids = np.asarray(token_ids, dtype="int32")
    inputs = forward_inputs(
        family_of(causal_lm), {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype=bool)}
    )
    return np.asarray(causal_lm(inputs))


def transformers_logits(model, token_ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(token_ids, dtype="int64"))).logits.numpy()


def load_transformers(folder, adapter=None):
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(adapter)) if adapter else model


@pytest.mark.parametrize(
    "kind, shape",
    [
        ("heads_first", (4, 48, 16)),
        ("heads_first", (2, 48, 16)),
        ("hidden_first", (48, 4, 16)),
        ("output", (4, 16, 48)),
        ("transpose", (48, 64)),
        ("transpose", (64, 48)),
    ],
)
def test_peft_factors_give_the_update_keras_lora_adds(kind, shape):
    rng = np.random.default_rng(0)
    rank = 3
    kernel_a = rng.normal(size=shape[:-1] + (rank,))
    kernel_b = rng.normal(size=(rank, shape[-1]))
    lora_a, lora_b = peft_factors(kind, kernel_a, kernel_b)
    np.testing.assert_allclose(lora_b @ lora_a, hf_weight(kind, kernel_a @ kernel_b), atol=1e-10)


def enable_random_lora(backbone, rank, seed):
    """LoRA on every projection, its B factors non-zero (so that the
    adapter changes the model)."""
    from pipeline import keras_internals
    from pipeline.stages.export import transformers_format

    names = {
        path.split("/")[-2]
        for path, _, kind in transformers_format(backbone).weights
        if kind != "copy"
    }
    backbone.enable_lora(rank, target_layer_names=sorted(names - {"token_embedding"}))
    for layer in keras_internals.lora_layers(backbone).values():
        layer.lora_alpha = 3 * rank  # a scale of 3: PEFT's alpha is not its rank
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        if weight.path.endswith("lora_kernel_b"):
            weight.assign(rng.normal(size=weight.shape) * 0.1)


def random_scales(backbone, seed):
    """Norm scales (and Gemma 4's layer scalars) away from their initial
    value, so that one exported to the wrong place, or not at all, changes
    the logits."""
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        if weight.path.endswith(("/scale", "/layer_scalar")):
            weight.assign(rng.normal(0, 0.3, weight.shape))


def assert_exports_exactly(causal_lm, folder, token_ids):
    """The merged export, and PEFT's adapter on the base export, give the
    Keras logits; every transformers weight comes from the file."""
    import transformers

    backbone = causal_lm.backbone
    write_transformers_weights(causal_lm, folder / "base", "float32")
    enable_random_lora(backbone, 2, seed=1)
    write_transformers_weights(causal_lm, folder / "merged", "float32")
    ranks = write_peft_adapter(backbone, folder / "peft", "base")
    expected = keras_logits(causal_lm, token_ids)
    _, loading = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder / "merged"), output_loading_info=True
    )
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    merged = transformers_logits(load_transformers(folder / "merged"), token_ids)
    np.testing.assert_allclose(merged, expected, atol=LOGIT_TOLERANCE)
    with_peft = transformers_logits(load_transformers(folder / "base", folder / "peft"), token_ids)
    np.testing.assert_allclose(with_peft, expected, atol=LOGIT_TOLERANCE)
    base = transformers_logits(load_transformers(folder / "base"), token_ids)
    assert np.abs(base - expected).max() > 100 * LOGIT_TOLERANCE  # the adapter changes the model
    return ranks


# Windows shorter than the 20 test tokens, and Gemma 3 with a global layer
# (every sixth), so that the sliding and global masks are both compared.
FAMILY_EXPORT_VARIANTS = {
    "gemma3": dict(num_layers=6, sliding_window_size=4),
    "mistral": dict(sliding_window=4),
    "llama3": dict(tie_word_embeddings=False),
    "qwen3": dict(
        num_query_heads=8, num_key_value_heads=4, head_dim=32
    ),  # heads x head_dim != hidden
    # Its tiny has every kind of Gemma 4 block; the global ones with fewer
    # key/value heads, as the 31B's.
    "gemma4": dict(sliding_window_size=4, num_global_key_value_heads=4),
}


@pytest.mark.parametrize("name", FAMILY_EXPORT_VARIANTS)
def test_every_familys_export_gives_the_keras_logits(name, tmp_path):
    """Random weights (norms too), LoRA on every projection: transformers'
    own implementation of the family gives the Keras logits, merged and
    with the PEFT adapter."""
    import keras
    import keras_hub

    from pipeline.parallel.runtime import set_seed

    family = FAMILIES[name]
    config = {**family.tiny_config, **FAMILY_EXPORT_VARIANTS[name]}
    with keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:1]).scope():
        set_seed(0)  # not keras.utils.set_random_seed: it breaks the session's tokenizers
        backbone = getattr(keras_hub.models, family.backbone_class)(**config, dtype="float32")
        causal_lm = getattr(keras_hub.models, family.causal_lm_class)(
            backbone=backbone, preprocessor=None
        )
        random_scales(backbone, seed=0)
        token_ids = (
            np.random.default_rng(2).integers(3, config["vocabulary_size"], (1, 20)).tolist()
        )
        ranks = assert_exports_exactly(causal_lm, tmp_path, token_ids)
    heads, kv_heads = config["num_query_heads"], config["num_key_value_heads"]
    per_head = {"q_proj": 2 * heads, "k_proj": 2 * kv_heads, "v_proj": 2 * kv_heads}
    if config.get(
        "num_global_key_value_heads"
    ):  # the global layers' keys: fewer heads, so a lower rank
        per_head["k_proj"] = (2 * config["num_global_key_value_heads"], 2 * kv_heads)
    # Every projection of the family's (Gemma 4's per-layer ones too) has the
    # rank; q, k, v one per head.
    assert {"o_proj", "gate_proj", "up_proj", "down_proj"} <= set(ranks)
    assert ranks == {**{module: 2 for module in ranks}, **per_head}


def test_kerashubs_gemma4_config_leaves_out_keys_as_values():
    """keras-hub 0.32: the Gemma 4 exporter's config.json has no
    `attention_k_eq_v`, so transformers would build the 31B's global layers
    with a value projection of their own (test above: a missing weight).
    The family writes its config itself; when this fails, KerasHub's can be
    taken again."""
    import keras
    import keras_hub

    from pipeline import keras_internals
    from pipeline.stages.export import transformers_config

    family = FAMILIES["gemma4"]
    with keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:1]).scope():
        backbone = keras_hub.models.Gemma4Backbone(**family.tiny_config, dtype="float32")
    assert "attention_k_eq_v" not in keras_internals.keras_hub_transformers_config(backbone)
    assert transformers_config(backbone)["attention_k_eq_v"] is True


def test_a_weight_without_a_transformers_name_stops_the_export():
    """Gemma 2's post-attention norm has no name in Gemma 1's table: a
    table that misses a weight stops the export, naming it, instead of
    writing a model without it."""
    from pipeline.models.families import gemma
    from pipeline.stages.export import transformers_name

    assert transformers_name(
        gemma.GEMMA2_TRANSFORMERS, "decoder_block_3/post_attention_norm/scale"
    ) == ("model.layers.3.post_attention_layernorm.weight", "copy")
    with pytest.raises(
        InputError,
        match=r"decoder_block_3/post_attention_norm/scale has no name in GemmaForCausalLM",
    ):
        transformers_name(gemma.TRANSFORMERS, "decoder_block_3/post_attention_norm/scale")


def test_gemma_2_exports_as_gemma_2(tmp_path):
    """Gemma 2 (post norms, soft caps, alternating sliding windows shorter
    than the input, `query_head_dim_normalize` off as the 27B's) in
    transformers' Gemma2ForCausalLM: the Keras logits, merged and as PEFT.
    KerasHub's exporter writes it as Gemma 1, and KerasHub's Gemma block
    scales queries by head_dim whatever the config says (keras-hub 0.32;
    when this fails, `gemma2_transformers_config` should follow the config)."""
    import keras
    import keras_hub

    from pipeline import keras_internals
    from pipeline.parallel.runtime import set_seed
    from pipeline.stages.export import transformers_config

    with keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:1]).scope():
        set_seed(0)
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=256,
            num_layers=3,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=48,
            intermediate_dim=128,
            head_dim=16,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            query_head_dim_normalize=False,
            attention_logit_soft_cap=50.0,
            final_logit_soft_cap=30.0,
            use_sliding_window_attention=True,
            sliding_window_size=4,
            dtype="float32",
        )
        causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        random_scales(backbone, seed=0)
        assert keras_internals.keras_hub_transformers_config(backbone)["model_type"] == "gemma"
        assert all(
            block.attention.query_head_dim_normalize for block in backbone.transformer_layers
        )
        assert transformers_config(backbone)["architectures"] == ["Gemma2ForCausalLM"]
        token_ids = np.random.default_rng(2).integers(3, 256, (1, 20)).tolist()
        assert_exports_exactly(causal_lm, tmp_path, token_ids)


def test_grouped_query_model_whose_heads_do_not_span_hidden_exports_exactly(tmp_path):
    """Gemma 7B's case (heads x head_dim != hidden) and 2B's (fewer key/value
    heads than query heads), which KerasHub 0.32's exporter gets wrong; with
    LoRA enabled and non-zero, so the merge is checked too."""
    import keras
    import keras_hub

    with keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:1]).scope():
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=1024,
            num_layers=2,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=48,
            intermediate_dim=128,
            head_dim=16,
            dtype="float32",
        )
        causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        ranks = assert_exports_exactly(causal_lm, tmp_path, [[2, 17, 99, 301, 5, 64, 700, 12]])
    assert ranks == {
        "q_proj": 8,
        "k_proj": 4,
        "v_proj": 4,
        "o_proj": 2,
        "gate_proj": 2,
        "up_proj": 2,
        "down_proj": 2,
    }


@pytest.mark.slow
def test_exported_tokenizer_tokenises_as_keras_without_sentencepiece(demo_run):
    """tokenizer.json is written, so transformers loads it with `tokenizers`
    alone, and gives the Keras tokenizer's ids on every demo text."""
    import keras_hub
    import transformers

    cfg, _, _ = demo_run
    folder = run_export(cfg)["transformers"]
    config = json.loads((folder / "tokenizer.json").read_text())
    assert config["model"]["type"] == "BPE" and config["model"]["byte_fallback"]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    keras_tokenizer = keras_hub.models.GemmaTokenizer.from_preset(cfg.model.preset)
    data = pd.read_csv(f"{cfg.run.root}/{cfg.run.name}/data/rewrites.csv")
    texts = (
        list(data["rewritten_text"])
        + list(data["rewrite_prompt"])
        + ["<start_of_turn>user\n  é 日本 🙂 42"]
    )
    default_call = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in texts:
        ids = list(map(int, keras_tokenizer(text)))
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        # As Gemma's published tokenizer: <bos> first in the default call.
        assert default_call(text)["input_ids"] == [keras_tokenizer.start_token_id, *ids], text


_EXPORTS = {}


def run_export(cfg, **changes):
    """The demo run's export (once per set of changes)."""
    key = tuple(sorted(changes.items()))
    if key not in _EXPORTS:
        paths = run_export_stage(
            dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, **changes)),
            log=lambda *_: None,
        )
        _EXPORTS[key] = {name: Path(path) for name, path in paths.items()}
    return _EXPORTS[key]


@pytest.mark.slow
def test_export_of_the_demo_adapter_predicts_the_pipelines_tokens(demo_run):
    """The fine-tuned demo model, exported and run by transformers: logits
    as Keras's, and greedy outputs on the holdout rows the same as the
    predict stage's own (model_outputs.csv)."""
    import transformers

    from pipeline.kaggle.transformers_predict import TransformersTokenizer, generate
    from pipeline.models.model import load_adapter, load_model
    from pipeline.run.run_dir import RunDir
    from pipeline.text.recovery import RecoveryFormatter

    cfg, _, _ = demo_run
    paths = run_export(cfg)
    run = RunDir(cfg)
    causal_lm, tokenizer = load_model(cfg, [cfg.predict.batch_size])
    load_adapter(causal_lm, run.adapter, cfg.model.preset)
    formatter = RecoveryFormatter(
        tokenizer, cfg.train.template, cfg.train.sequence_length, cfg.train.max_response_tokens
    )
    rows, _ = formatter.fit_texts(run.read_predict_rows(log=lambda *_: None))
    prompts = formatter.prompt_ids(rows)
    model = load_transformers(paths["transformers"])
    for prompt in prompts[:3]:
        np.testing.assert_allclose(
            transformers_logits(model, [prompt]),
            keras_logits(causal_lm, [prompt]),
            atol=LOGIT_TOLERANCE,
        )

    hf_tokenizer = TransformersTokenizer(
        transformers.AutoTokenizer.from_pretrained(str(paths["transformers"]))
    )
    assert formatter.prompt_ids(rows) == RecoveryFormatter(
        hf_tokenizer, cfg.train.template, cfg.train.sequence_length, cfg.train.max_response_tokens
    ).prompt_ids(rows)
    outputs = generate(
        model,
        hf_tokenizer,
        prompts,
        cfg.predict.batch_size,
        cfg.predict.max_new_tokens,
        "<end_of_turn>",
        log=lambda *_: None,
    )
    expected = pd.read_csv(run.raw_outputs, dtype=str, keep_default_na=False)
    assert list(expected["id"]) == list(rows["id"])
    assert [text.strip() for text in hf_tokenizer.detokenize(outputs)] == list(
        expected["rewrite_prompt"]
    )
    assert sum(map(len, outputs)) > 2 * len(outputs)  # real answers, not empty ones


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.transformers])
def test_block_numbers_of_two_digits_are_named(name):
    """Gemma 7B has 28 blocks, the stand-ins at most 4: every per-block
    weight of block 27 is named for block 27, not 2 or 7."""
    from pipeline.stages.export import transformers_name

    transformers_format = FAMILIES[name].transformers
    per_block = [w for w in transformers_format.weights if "{i}" in w[0]]
    assert per_block
    for keras_path, transformers_path, kind in per_block:
        assert transformers_name(transformers_format, keras_path.format(i=27)) == (
            transformers_path.format(i=27),
            kind,
        )
