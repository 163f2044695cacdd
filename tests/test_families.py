"""Every model family (pipeline/models/families/) through the model layer:
KerasHub's classes and presets, the weights the layout map shards and the
plans count, the mesh checks, decoding tokens equal to KerasHub's
`generate`, and (slow) every stage on each family's tiny stand-in, one of
them on the simulated pod."""

import json
import re

import jax
import keras
import keras_hub
import numpy as np
import pandas as pd
import pytest
from processes import ROOT, run_stage
from test_pod import lora_weights

from pipeline.errors import InputError
from pipeline.models import flops
from pipeline.models.decoding import CachedDecoder, merged_kernels
from pipeline.models.families import llama_style
from pipeline.models.families.family import ModelSpec
from pipeline.models.families.registry import FAMILIES
from pipeline.models.memory import plan_memory
from pipeline.models.model import (
    enable_lora,
    forward_inputs,
    model_distribution,
    read_model_spec,
)
from pipeline.parallel.distribution import DistributionError, check_shardable
from pipeline.parallel.runtime import set_seed
from pipeline.run.config import DistributionConfig, LoraConfig, load_config

OTHER_FAMILIES = [name for name in FAMILIES if name != "gemma"]
# Whether the published tokenizer's default call adds the start token (Gemma's
# <bos>, Mistral's <s>, Llama 3's <|begin_of_text|>; Qwen 3 has none).
PUBLISHED_TOKENIZER_ADDS_START = {
    "gemma": True,
    "gemma3": True,
    "gemma4": True,
    "mistral": True,
    "llama3": True,
    "qwen3": False,
}
MESH = DistributionConfig(mesh_shape=[1, 8])


def random_causal_lm(family, **overrides):
    """A random-weight CausalLM of the family's tiny architecture, sharded
    on the (1, 8) mesh by the family's layout map."""
    config = {**family.tiny_config, **overrides}
    set_seed(0)
    with model_distribution(MESH, ModelSpec(family, config), [8]).scope():
        backbone = getattr(keras_hub.models, family.backbone_class)(**config, dtype="float32")
        return getattr(keras_hub.models, family.causal_lm_class)(
            backbone=backbone, preprocessor=None
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_family_names_kerashubs_classes_and_presets(name):
    family = FAMILIES[name]
    backbone_class = getattr(keras_hub.models, family.backbone_class)
    assert getattr(keras_hub.models, family.causal_lm_class).backbone_cls is backbone_class
    assert getattr(keras_hub.models, family.tokenizer_class).backbone_cls is backbone_class
    assert set(family.presets) <= set(backbone_class.presets)
    assert family.chat_turn.count("{content}") == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_dims_layout_and_flops_cover_the_backbone(name):
    """Every matrix of the built backbone is in `weight_dims` with its
    shape, sharded as the layout says; the FLOPs count its matmuls (every
    matrix but the embedding tables only looked up)."""
    family = FAMILIES[name]
    causal_lm = random_causal_lm(family)
    spec = ModelSpec(family, family.tiny_config)
    dims, layout = spec.weight_dims(), family.layout_axes("batch", "model")
    matrices = [w for w in causal_lm.backbone.weights if len(w.shape) >= 2]
    for w in matrices:
        assert w.path in dims, f"{w.path} is missing from {name}'s weight_dims"
        assert tuple(w.shape) == tuple(size for _, size in dims[w.path]), w.path
        sharded = [
            a
            for a in next(
                (axes for pattern, axes in layout.items() if re.fullmatch(pattern, w.path)), ()
            )
            if a is not None
        ]
        assert ("model" in sharded) == (not w.value.sharding.is_fully_replicated), w.path
    assert {w.path for w in matrices} == set(dims)
    untied = "token_embedding/reverse_embeddings" in dims  # the input embedding is a lookup
    lookups = {"per_layer_token_embedding/embeddings"} | (
        {"token_embedding/embeddings"} if untied else set()
    )
    matmuls = sum(int(np.prod(w.shape)) for w in matrices if w.path not in lookups)
    assert flops.matmul_parameter_count(spec) == matmuls


@pytest.mark.parametrize("name", FAMILIES)
def test_the_default_lora_adapts_the_seven_projections_of_every_block(name):
    """lora.target_layers: null (the default config's) resolves to the
    family's own names: the attention's four and the feed-forward's three
    kernels of every block, each a layer of the built model; a name the
    family does not have is refused with the family's names."""
    family = FAMILIES[name]
    causal_lm = random_causal_lm(family)
    default = load_config(None).lora
    assert default.target_layers is None
    enabled = enable_lora(causal_lm, default)
    # Every projection kernel of every block (Gemma 4's later blocks share
    # their key and value with earlier ones, and have none of their own).
    kernels = [
        path
        for path in ModelSpec(family, family.tiny_config).weight_dims()
        if path.split("/")[-2] in family.lora_targets
    ]
    layers = ModelSpec(family, family.tiny_config).dims.num_layers
    assert len(family.lora_targets) == 7 and len(enabled) == len(kernels) >= 5 * layers
    assert {layer.name for layer in enabled} == set(family.lora_targets)
    feed_forward = {"gemma": "ffw_linear", "gemma3": "ffw_linear", "gemma4": "ffw_linear"}
    assert feed_forward.get(name, "feedforward_output_dense") in family.lora_targets
    wrong = "feedforward_gate_dense" if "ffw_gating" in family.lora_targets else "ffw_gating"
    with pytest.raises(InputError, match=rf"{wrong}: no such layer in a {name} model, whose "):
        ModelSpec(family, family.tiny_config).lora_targets(["query", wrong])


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cut_holds_the_models_blocks_of_its_kinds(name):
    """`make plan-check` draws each published architecture from cuts of it:
    a cut of the first block of each kind is made of blocks that hold the
    weights and key/value cache of those blocks of the model (Gemma 4:
    local and global, own and shared keys/values; one kind elsewhere)."""
    family = FAMILIES[name]
    kinds_of = {}
    for architecture, config in family.architectures.items():
        spec = ModelSpec(family, config)
        kinds = spec.block_kinds()
        firsts = [kinds.index(kind) for kind in dict.fromkeys(kinds)]
        kinds_of[architecture] = len(firsts)
        cut = spec.cut([kinds[i] for i in firsts])
        assert cut.block_kinds() == [kinds[i] for i in firsts]
        assert [block_weights(cut, j) for j in range(len(firsts))] == [
            block_weights(spec, i) for i in firsts
        ]
        assert cut.cache_shapes() == [spec.cache_shapes()[i] for i in firsts]
    # Gemma 4 31B's blocks all have their own keys and values.
    several = {"gemma4_2b": 4, "gemma4_4b": 4, "gemma4_31b": 2}
    assert kinds_of == {a: several.get(a, 1) for a in family.architectures}


def block_weights(spec, block):
    """{weight path within the block: shape} of block `block` of `spec`."""
    return {
        path.split("/", 1)[1]: [size for _, size in dims]
        for path, dims in spec.weight_dims().items()
        if re.fullmatch(rf"[a-z_]+_{block}", path.split("/")[0])
    }


def test_llama_style_layout_is_kerashubs_llama_layout_map():
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ["data", "shard"], keras.distribution.list_devices()
    )
    layout_map = keras_hub.models.Llama3Backbone.get_layout_map(mesh, "shard", "data")
    ours = llama_style.llama_style_layout_axes("data", "shard")
    assert {k: tuple(layout_map[k].axes) for k in layout_map} == {
        k: v for k, v in ours.items() if k != "token_embedding/reverse_embeddings"
    }


def test_mesh_check_says_which_dimension_to_change():
    gemma3_4b = ModelSpec(FAMILIES["gemma3"], FAMILIES["gemma3"].architectures["gemma3_4b"])
    layout = FAMILIES["gemma3"].layout_axes("batch", "model")
    with pytest.raises(
        DistributionError, match=r"num_key_value_heads=4 .* 'model' mesh axis \(8\)"
    ):
        check_shardable(layout, gemma3_4b.weight_dims(), [1, 8], ["batch", "model"])
    check_shardable(layout, gemma3_4b.weight_dims(), [2, 4], ["batch", "model"])
    mistral = FAMILIES["mistral"]
    check_shardable(
        mistral.layout_axes("batch", "model"),
        ModelSpec(mistral, mistral.architectures["mistral_7b"]).weight_dims(),
        [1, 8],
        ["batch", "model"],
    )


def test_a_preset_of_another_family_a_vision_tower_or_experts_is_refused(tmp_path):
    other = tmp_path / "phi"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"class_name": "Phi3Backbone", "config": {}}))
    with pytest.raises(
        InputError,
        match=r"is a Phi3Backbone, which the pipeline does not run; it runs gemma "
        r"\(GemmaBackbone\), gemma3 .*mistral.*llama3.*qwen3",
    ):
        read_model_spec(other)
    vision = tmp_path / "gemma3_vision"
    vision.mkdir()
    config = dict(
        FAMILIES["gemma3"].tiny_config, vision_encoder={"class_name": "Gemma3VisionEncoder"}
    )
    (vision / "config.json").write_text(
        json.dumps({"class_name": "Gemma3Backbone", "config": config})
    )
    with pytest.raises(InputError, match="vision tower.*gemma3_instruct_4b_text"):
        read_model_spec(vision)
    experts = tmp_path / "gemma4_moe"
    experts.mkdir()
    config = dict(FAMILIES["gemma4"].tiny_config, enable_moe_block=True, num_experts=8)
    (experts / "config.json").write_text(
        json.dumps({"class_name": "Gemma4Backbone", "config": config})
    )
    with pytest.raises(
        InputError, match="mixture-of-experts.*take a dense one: gemma4_instruct_2b"
    ):
        read_model_spec(experts)


@pytest.mark.slow
def test_gemma4_preset_loads_its_text_decoder_alone(tmp_path):
    """A Gemma 4 preset with a vision tower (as every published one has)
    loads without it: the decoder's weights are the preset's, the tower's
    are not read, and the model runs on token ids alone."""
    from pipeline.models.model import forward_inputs, load_model
    from pipeline.models.tiny import with_vision_tower

    family = FAMILIES["gemma4"]
    with keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:1]).scope():
        set_seed(0)
        backbone = keras_hub.models.Gemma4Backbone(**family.tiny_config, dtype="float32")
        text_only = keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=None)
        tokenizer = keras_hub.models.Gemma4Tokenizer(
            proto=(ROOT / "artifacts/tiny/tokenizer.spm").read_bytes(),
            has_vision_tokens=False,
            has_video_tokens=False,
        )
        text_only.preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(tokenizer)
        with_tower = with_vision_tower(family, text_only)
    assert with_tower.backbone.vision_encoder is not None
    with_tower.save_to_preset(str(tmp_path / "preset"))
    cfg = load_config(None, [f"model.preset={tmp_path / 'preset'}", "model.dtype=float32"])
    causal_lm, _ = load_model(cfg, [8])
    assert causal_lm.backbone.vision_encoder is None and causal_lm.backbone.audio_encoder is None
    saved = {w.path: np.asarray(w.value) for w in with_tower.backbone.weights}
    assert {w.path for w in causal_lm.backbone.weights} < set(saved)
    for w in causal_lm.backbone.weights:
        np.testing.assert_array_equal(np.asarray(w.value), saved[w.path], err_msg=w.path)
    ids = np.arange(3, 13, dtype="int32")[None]
    inputs = forward_inputs(family, {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)})
    np.testing.assert_allclose(
        np.asarray(causal_lm(inputs)), np.asarray(text_only(inputs)), atol=1e-5
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_memory_plan_of_every_published_architecture(name):
    """The plan's frozen weights on a v3-8 are the model's weights (in
    bfloat16), an eighth of each sharded one per core."""
    cfg = load_config("configs/kaggle_tpu_v3_8.yaml")
    family = FAMILIES[name]
    for architecture, config in family.architectures.items():
        spec = ModelSpec(family, config)
        total = sum(
            int(np.prod([size for _, size in sizes])) for sizes in spec.weight_dims().values()
        )
        plan = plan_memory(cfg, spec)
        assert total * 2 / 8 <= plan.frozen <= total * 2 / 8 * 1.2, architecture
        assert plan.kv_cache > 0 and plan.activations > 0


def ragged_prompts(rng, lengths, length, vocabulary_size):
    token_ids = np.zeros((len(lengths), length), "int32")
    padding_mask = np.zeros((len(lengths), length), bool)
    for row, n in enumerate(lengths):
        token_ids[row, :n] = rng.integers(10, vocabulary_size, n)
        padding_mask[row, :n] = True
    return token_ids, padding_mask


def kerashub_greedy_tokens(causal_lm, inputs, stop):
    """KerasHub's `generate` (greedy); for Gemma 3, whose `generate` fails
    without a preprocessor (pinned below), the step it compiles, run eagerly."""
    causal_lm.compile(sampler="greedy")
    if isinstance(causal_lm, keras_hub.models.Gemma3CausalLM):
        return causal_lm.generate_step(inputs, stop)["token_ids"]
    return causal_lm.generate(inputs, stop_token_ids=stop)["token_ids"]


def test_kerashub_gemma3_generate_fails_without_a_preprocessor():
    """keras-hub 0.32: Gemma 3's text-only `generate_step` returns
    `images: None`, which `generate` then concatenates across batches. The
    pipeline decodes with its own `CachedDecoder`, so it is not touched;
    when this starts passing, `kerashub_greedy_tokens` can call `generate`
    for Gemma 3 too."""
    causal_lm = random_causal_lm(FAMILIES["gemma3"])
    inputs = {"token_ids": np.full((1, 8), 5, "int32"), "padding_mask": np.arange(8)[None] < 4}
    with pytest.raises(ValueError, match="None is not a valid value for jnp.array"):
        causal_lm.generate(inputs, stop_token_ids=[1])


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("gemma3", {"sliding_window_size": 8}),
        ("mistral", {"sliding_window": 8}),
        ("llama3", {}),
        ("qwen3", {}),
        ("gemma4", {"sliding_window_size": 8}),
    ],
    ids=["gemma3-window-8", "mistral-window-8", "llama3", "qwen3", "gemma4-window-8"],
)
def test_familys_decoder_gives_kerashubs_greedy_tokens_whatever_the_batch(name, overrides):
    """On the (1, 8) mesh, LoRA on: a batch of ragged prompts, padded to one
    bucket, decodes each row to the tokens `generate` gives it alone. Gemma
    3's, 4's and Mistral's windows are shorter than the longer prompts."""
    causal_lm = random_causal_lm(FAMILIES[name], **overrides)
    enable_lora(causal_lm, LoraConfig(rank=4, target_layers=["query", "value"]))
    rng = np.random.default_rng(1)
    for layer in causal_lm.backbone.weights:
        if "lora_kernel_b" in layer.path:  # zeros at first: make the adapter count
            layer.assign(rng.normal(0, 0.05, layer.shape).astype("float32"))
    lengths, new_tokens, length = [5, 19, 12], 12, 40
    token_ids, padding_mask = ragged_prompts(
        rng, lengths, length, causal_lm.backbone.vocabulary_size
    )
    stop = [int(token_ids[0, 0])]  # some id: rows that write it end there
    decoded = CachedDecoder(causal_lm, stop)(token_ids, padding_mask, new_tokens)
    for row, n in enumerate(lengths):
        alone = {
            "token_ids": token_ids[row : row + 1, : n + new_tokens],
            "padding_mask": padding_mask[row : row + 1, : n + new_tokens],
        }
        expected = list(np.asarray(kerashub_greedy_tokens(causal_lm, alone, stop))[0, n:])
        got = list(decoded[row, n : n + new_tokens])
        end = expected.index(stop[0]) + 1 if stop[0] in expected else new_tokens
        assert got[:end] == expected[:end], f"row {row}"


def random_lm_in(family, dtype, seed):
    set_seed(seed)
    keras.config.set_dtype_policy(dtype)
    try:
        backbone = getattr(keras_hub.models, family.backbone_class)(**family.tiny_config)
        return getattr(keras_hub.models, family.causal_lm_class)(
            backbone=backbone, preprocessor=None
        )
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_familys_decoder_in_bfloat16_is_as_close_to_float32_as_kerashubs(name):
    """In bfloat16 the decoder rounds where its order differs from KerasHub's
    (queries scaled before the product, the softmax divided after it, as
    flash attention does), so its logits are not KerasHub's bit for bit and
    a greedy token may differ where two logits nearly tie. They are as near
    the float32 model's with the same weights as KerasHub's bfloat16 logits
    are (mean error; Gemma 4's, with unscaled normalized queries, is ten
    times the others' for both)."""
    family = FAMILIES[name]
    causal_lm = random_lm_in(family, "bfloat16", seed=6)
    exact = random_lm_in(family, "float32", seed=6)
    for weight, rounded in zip(exact.weights, causal_lm.weights, strict=True):
        weight.assign(np.asarray(rounded.value, "float32"))
    token_ids = np.random.default_rng(0).integers(10, 1000, (2, 48)).astype("int32")
    decoder = CachedDecoder(causal_lm, [1])
    # Each compiled whole (run op by op, the first run compiles every op).
    logits, _ = jax.jit(
        lambda ids: decoder.forward(
            merged_kernels(causal_lm.backbone),
            decoder.embed(ids),
            decoder.empty_caches(2, 48),
            0,
            48,
        )
    )(token_ids)
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids, bool)}
    inputs = forward_inputs(family, inputs)
    truth = np.asarray(exact.predict_on_batch(inputs), "float32")
    kerashub = np.asarray(causal_lm.predict_on_batch(inputs), "float32")
    kerashub_error = np.abs(kerashub - truth).mean()
    assert np.abs(np.asarray(logits, "float32") - truth).mean() < 1.25 * kerashub_error


BUILD_FAMILIES = """
import sys
from pipeline.parallel.runtime import setup_environment
from pipeline.run.config import DistributionConfig
setup_environment(DistributionConfig(host_device_count=0))
from pipeline.models.tiny import build_tiny_family
for name in sys.argv[2:]:
    build_tiny_family(sys.argv[1], name, pretrain_steps=100, log=lambda *_: None)
"""


@pytest.fixture(scope="module")
def family_presets(tiny):
    """Each family's tiny preset, built as `make tiny` builds them but
    pre-trained for 100 steps, not 300 (the stages need a model that writes
    words, not one that learns the demo's task; 300 steps cost the suite about
    twelve minutes more). Kept under artifacts/tiny/tests/ between sessions."""
    import subprocess
    import sys

    root = tiny.root / "tests"
    # In a child process: the builder seeds TensorFlow (for its tf.data
    # shuffle), which here would break the session's tokenizers (see
    # runtime.set_seed).
    subprocess.run(
        [sys.executable, "-c", BUILD_FAMILIES, str(root), *OTHER_FAMILIES], cwd=ROOT, check=True
    )
    return {name: root / f"{name}_tiny" for name in OTHER_FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_chat_turn_ends_at_a_stop_token(family_presets, name):
    from pipeline.text.tokens import stop_token_ids, tokenize_batch

    family = FAMILIES[name]
    tokenizer = getattr(keras_hub.models, family.tokenizer_class).from_preset(
        str(family_presets[name])
    )
    stops = stop_token_ids(tokenizer, family.end_of_turn)
    (ids,) = tokenize_batch(
        tokenizer, [family.chat_turn.format(content="Make it rhyme.")], add_bos=True
    )
    assert (ids[0] == tokenizer.start_token_id) == (tokenizer.start_token_id is not None)
    end_of_turn = (
        tokenizer.token_to_id(family.end_of_turn) if family.end_of_turn else tokenizer.end_token_id
    )
    assert end_of_turn in stops
    if family.end_of_turn:  # one piece, inside the request's own turn
        assert end_of_turn in ids


def family_settings(root, preset, tiny):
    return [
        f"run.root={root}",
        f"model.preset={preset}",
        f"score.encoder={tiny.encoder}",
        "data.rewriter=model",
        "data.prompts=prompts/rewrite_prompts.txt",
        "data.max_rows=24",
        "data.max_new_tokens=12",
        "train.epochs=1",
        "predict.max_new_tokens=8",
        "mean_prompt.steps=2",
        "mean_prompt.beam_width=4",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_every_stage_runs_on_the_familys_stand_in(family_presets, tiny, tmp_path, name):
    """data (the model rewrites), finetune, predict, score, export on the
    family's tiny preset; then the Kaggle notebook's path, with transformers'
    own implementation of the family, writes the predict stage's submission."""
    import os

    from pipeline.stages.data import run_data_stage
    from pipeline.stages.finetune import run_finetune_stage
    from pipeline.stages.predict import run_predict_stage
    from pipeline.stages.score import run_score_stage

    os.chdir(ROOT)
    cfg = load_config(None, family_settings(tmp_path, family_presets[name], tiny))
    logs = []
    run_data_stage(cfg, log=logs.append)
    rewrites = pd.read_csv(tmp_path / "cpu_tiny" / "data" / "rewrites.csv", keep_default_na=False)
    assert len(rewrites) == 24 and (rewrites["rewritten_text"].str.len() > 0).mean() > 0.5
    adapter = run_finetune_stage(cfg, log=logs.append)
    assert adapter.exists() and any("finetune: epoch 1/1 done" in line for line in logs)
    run_predict_stage(cfg, log=logs.append)
    predictions = pd.read_csv(
        tmp_path / "cpu_tiny" / "predict" / "submission.csv", keep_default_na=False
    )
    assert len(predictions) > 0 and (predictions["rewrite_prompt"].str.len() > 0).all()
    score = run_score_stage(cfg, log=logs.append)
    assert -1 <= score <= 1  # cos**3: a stand-in's prompt may point away from the truth
    assert_export_and_notebook_match_keras(cfg, rewrites, tmp_path)


def assert_export_and_notebook_match_keras(cfg, rewrites, tmp_path):
    """The exported tokenizer gives the Keras ids; the merged export, and the
    PEFT adapter on the base export, give the Keras logits of the fine-tuned
    model; the notebook's predict (settings as the bundle writes them, PEFT
    adapter on the base) writes the predict stage's submission."""
    import dataclasses
    import shutil

    import transformers
    from test_export import LOGIT_TOLERANCE, keras_logits, load_transformers, transformers_logits

    from pipeline.kaggle.transformers_predict import TransformersTokenizer, run_transformers_predict
    from pipeline.models.model import family_of, load_adapter, load_model
    from pipeline.run.run_dir import RunDir
    from pipeline.stages.bundle import bundle_settings
    from pipeline.stages.export import run_export_stage
    from pipeline.text.recovery import RecoveryFormatter
    from pipeline.text.tables import write_table

    quiet = dict(log=lambda *_: None)
    paths = run_export_stage(cfg, **quiet)
    base_cfg = dataclasses.replace(
        cfg, export=dataclasses.replace(cfg.export, adapter="none", out="export_base", peft=False)
    )
    base_model = run_export_stage(base_cfg, **quiet)["transformers"]
    run = RunDir(cfg)
    causal_lm, tokenizer = load_model(cfg, [cfg.predict.batch_size])
    load_adapter(causal_lm, run.adapter, cfg.model.preset)
    hf_tokenizer = TransformersTokenizer(
        transformers.AutoTokenizer.from_pretrained(paths["transformers"])
    )
    # transformers' default call starts with the start token where the
    # family's published tokenizer adds one (as KerasHub's preprocessors do).
    default_call = transformers.AutoTokenizer.from_pretrained(paths["transformers"])
    start = [tokenizer.start_token_id] * PUBLISHED_TOKENIZER_ADDS_START[family_of(causal_lm).name]
    for text in list(rewrites["rewritten_text"][:8]) + ["  é 日本 🙂 42\n\nnew paragraph"]:
        assert hf_tokenizer([text]) == [list(map(int, tokenizer(text)))], text
        assert default_call(text)["input_ids"] == start + list(map(int, tokenizer(text))), text
    formatter = RecoveryFormatter(
        tokenizer, cfg.train.template, cfg.train.sequence_length, cfg.train.max_response_tokens
    )
    rows, _ = formatter.fit_texts(run.read_predict_rows(**quiet))
    prompts = formatter.prompt_ids(rows)
    assert prompts == RecoveryFormatter(
        hf_tokenizer, cfg.train.template, cfg.train.sequence_length, cfg.train.max_response_tokens
    ).prompt_ids(rows)
    merged, with_peft = (
        load_transformers(paths["transformers"]),
        load_transformers(base_model, paths["peft_adapter"]),
    )
    for prompt in prompts[:2]:
        expected = keras_logits(causal_lm, [prompt])
        np.testing.assert_allclose(
            transformers_logits(merged, [prompt]), expected, atol=LOGIT_TOLERANCE
        )
        np.testing.assert_allclose(
            transformers_logits(with_peft, [prompt]), expected, atol=LOGIT_TOLERANCE
        )

    bundle = tmp_path / "bundle"
    shutil.copytree(paths["peft_adapter"], bundle / "peft_adapter")
    family = read_model_spec(cfg.model.preset).family
    recovery = (cfg.train.template, cfg.train.sequence_length, cfg.train.max_response_tokens)
    settings = bundle_settings(cfg, recovery, None, "peft_adapter", None, family.end_of_turn)
    settings.update(base_model=base_model, torch_dtype="float32")
    write_table(run.read_predict_rows(**quiet), tmp_path / "test.csv")
    run_transformers_predict(
        settings, bundle, tmp_path / "test.csv", tmp_path / "submission.csv", **quiet
    )
    expected = pd.read_csv(run.submission, dtype=str, keep_default_na=False)
    written = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    assert list(written["id"]) == list(expected["id"])
    assert list(written["rewrite_prompt"]) == list(expected["rewrite_prompt"])


@pytest.mark.slow
@pytest.mark.pod
def test_mistral_on_the_pod_gives_the_one_process_rewrites_and_adapter(
    family_presets, tiny, tmp_path
):
    settings = family_settings(tmp_path, family_presets["mistral"], tiny)[1:] + [
        "distribution.mesh_shape=[2,4]"
    ]
    for stage in ("data", "finetune"):
        run_stage(
            stage,
            settings + [f"run.root={tmp_path / 'one'}"],
            processes=1,
            log_dir=tmp_path / "logs-one",
        )
        run_stage(
            stage,
            settings + [f"run.root={tmp_path / 'pod'}"],
            processes=2,
            log_dir=tmp_path / "logs-pod",
        )
    one, pod = tmp_path / "one" / "cpu_tiny", tmp_path / "pod" / "cpu_tiny"
    assert (pod / "data" / "rewrites.csv").read_bytes() == (
        one / "data" / "rewrites.csv"
    ).read_bytes()
    expected, got = (
        lora_weights(one / "finetune" / "adapter.lora.h5"),
        lora_weights(pod / "finetune" / "adapter.lora.h5"),
    )
    assert expected.keys() == got.keys() and len(expected) > 2
    for weight in expected:
        np.testing.assert_allclose(got[weight], expected[weight], rtol=0, atol=5e-5, err_msg=weight)


def closing_special_token(chat_turn):
    """The special token that closes the user's turn, right after the
    request (`<end_of_turn>`, `<|eot_id|>`), or None."""
    match = re.match(r"<[^<>\s]+>", chat_turn.split("{content}")[1])
    return match.group(0) if match else None


TURNS_CLOSED_BY_A_TOKEN = [f for f in FAMILIES.values() if closing_special_token(f.chat_turn)]


def test_most_families_close_their_turns_with_a_token():
    assert {f.name for f in TURNS_CLOSED_BY_A_TOKEN} >= {
        "gemma",
        "gemma3",
        "gemma4",
        "llama3",
        "qwen3",
    }


@pytest.mark.parametrize("family", TURNS_CLOSED_BY_A_TOKEN, ids=lambda f: f.name)
def test_decoding_stops_at_the_token_that_closes_a_turn(family, tiny):
    """The model closes its own turn with the token that closed the user's:
    a family whose stop tokens leave it out (Llama 3 without `<|eot_id|>`)
    would decode every row to max_new_tokens."""
    from pipeline.models.tiny import family_tokenizer
    from pipeline.text.tokens import stop_token_ids

    if family.name == "gemma":
        tokenizer = keras_hub.models.GemmaTokenizer(proto=tiny.spm.read_bytes())
    else:
        tokenizer = family_tokenizer(family, tiny)
    closing = tokenizer.token_to_id(closing_special_token(family.chat_turn))
    assert closing in stop_token_ids(tokenizer, family.end_of_turn)
