"""Loading a model under the run's distribution, and its LoRA adapter.

The preset's config.json says which family the model is
(`pipeline.models.families`); the family gives the layout map and the
mesh checks. The model is used with `preprocessor=None`: the pipeline
tokenises itself (see `recovery.py` and `generation.py`) so that training
and generation see exactly the same prompt tokens.

Example:
```python
causal_lm, tokenizer = load_model(cfg, batch_sizes=[cfg.predict.batch_size])
enable_lora(causal_lm, cfg.lora)
save_adapter(causal_lm, cfg, "runs/x/finetune/adapter.lora.h5")
```
"""

import json
from pathlib import Path

from pipeline.errors import InputError, MissingInputError
from pipeline.models.families import gemma
from pipeline.models.families.family import ModelSpec
from pipeline.models.families.registry import by_backbone_class
from pipeline.parallel.distribution import build_distribution
from pipeline.parallel.runtime import quiet_native_logs
from pipeline.run.storage import adapter_settings_path

# The projections of a decoder block, by Gemma's KerasHub layer names (what
# `keras_internals.DecoderBlock` calls every family's); `CachedDecoder` reads them.
PROJECTIONS = gemma.PROJECTIONS
PER_HEAD_INPUT = ("query", "key", "value")  # kernels with a heads and a head_dim axis


def read_model_spec(preset):
    """The model's family and backbone config (its config.json), fetched
    without the weights; refuses a family or variant the pipeline does not
    run, saying what to pick instead."""
    from pipeline import keras_internals

    config = keras_internals.read_preset_json(str(preset))
    family = by_backbone_class(config.get("class_name"), preset)
    family.check_config(config["config"])
    return ModelSpec(family, config["config"])


def model_distribution(distribution_cfg, spec, batch_sizes):
    """The Keras distribution of the model `spec` on the configured mesh,
    checked (`parallel.distribution.build_distribution`), not yet set."""
    return build_distribution(
        distribution_cfg, spec.family.layout_axes, spec.weight_dims(), batch_sizes
    )


def load_model(cfg, batch_sizes):
    """Checks the mesh against the preset, sets the distribution, loads the
    weights sharded. Returns (the family's CausalLM without preprocessor,
    its tokenizer)."""
    import keras
    import keras_hub

    from pipeline import keras_internals

    spec = read_model_spec(cfg.model.preset)
    keras.distribution.set_distribution(model_distribution(cfg.distribution, spec, batch_sizes))
    preset = str(cfg.model.preset)
    with quiet_native_logs():  # SentencePiece's normalizer notice
        tokenizer = getattr(keras_hub.models, spec.family.tokenizer_class).from_preset(preset)
    causal_lm_class = getattr(keras_hub.models, spec.family.causal_lm_class)
    if spec.family.text_only_config:
        backbone = keras_internals.load_backbone(
            preset, causal_lm_class.backbone_cls, cfg.model.dtype, **spec.family.text_only_config
        )
        causal_lm = causal_lm_class(backbone=backbone, preprocessor=None)
    else:
        causal_lm = causal_lm_class.from_preset(preset, preprocessor=None, dtype=cfg.model.dtype)
    return causal_lm, tokenizer


def forward_inputs(family, x):
    """The inputs of the family's model for {token_ids, padding_mask}
    (numpy): with `position_ids` where the backbone takes them, 0, 1, ...
    on every row (the pipeline pads on the right)."""
    if not family.position_ids:
        return x
    import numpy as np

    batch, length = x["token_ids"].shape
    return dict(
        x, position_ids=np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    )


def family_of(causal_lm):
    """The family of a loaded model."""
    return by_backbone_class(type(causal_lm.backbone).__name__)


def spec_of(causal_lm):
    """The `ModelSpec` of a loaded model."""
    return ModelSpec(family_of(causal_lm), causal_lm.backbone.get_config())


def projections(backbone):
    """(decoder index, name in PROJECTIONS, layer) of every projection of a
    backbone `keras_internals.decoder_model` reads (the family's own layer
    under Gemma's name; none where a block has no such layer, as Gemma 4's
    blocks that read another's keys and values)."""
    from pipeline import keras_internals

    for i, block in enumerate(keras_internals.decoder_model(backbone).blocks):
        for name in PROJECTIONS:
            if getattr(block, name) is not None:
                yield i, name, getattr(block, name)


def enable_lora(causal_lm, lora_cfg):
    """LoRA on the configured layers (null: the family's seven projections),
    scaled by alpha / rank; a name no layer has is refused."""
    from pipeline import keras_internals

    backbone = causal_lm.backbone
    targets = spec_of(causal_lm).lora_targets(lora_cfg.target_layers)
    backbone.enable_lora(lora_cfg.rank, target_layer_names=targets)
    enabled = list(keras_internals.lora_layers(backbone).values())
    # Backbone.enable_lora takes no alpha; the layers read it at call time.
    for layer in enabled:
        layer.lora_alpha = lora_cfg.alpha
    return enabled


# What an adapter's json records of the prompts it was trained on; predict and
# the Kaggle bundle format prompts by it.
RECOVERY_FORMAT = ("template", "sequence_length", "max_response_tokens")


def save_adapter(causal_lm, cfg, path, **facts):
    """Writes the LoRA weights (`.lora.h5`, the file KerasHub's
    `load_lora_weights` reads) and, beside them (`adapter.json`), what the
    adapter is: its LoRA settings (the resolved target layers), the preset
    and family it was trained on, the dtype, and the recovery prompt format
    (`RECOVERY_FORMAT`), and any other `facts` (e.g. its step). Every
    process calls it: LoRA factors sharded over
    several hosts are gathered first; process 0 writes."""
    from pipeline import keras_internals
    from pipeline.parallel import hosts

    backbone = causal_lm.backbone
    # Backbone.save_lora_weights reads values that one host of a pod does
    # not hold: gather them first.
    factors = {
        index: (
            hosts.to_numpy(layer.lora_kernel_a.value),
            hosts.to_numpy(layer.lora_kernel_b.value),
        )
        for index, layer in keras_internals.lora_layers(backbone).items()
    }
    if not hosts.is_main_process():
        return
    path = Path(path)
    keras_internals.write_lora_file(path, keras_internals.lora_rank(backbone), factors)
    settings = {
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "target_layers": spec_of(causal_lm).lora_targets(cfg.lora.target_layers),
        "preset": str(cfg.model.preset),
        "family": family_of(causal_lm).name,
        "dtype": cfg.model.dtype,
        **{key: getattr(cfg.train, key) for key in RECOVERY_FORMAT},
        **facts,
    }
    adapter_settings_path(path).write_text(json.dumps(settings, indent=2))


def preset_name(preset):
    """A preset's name wherever it is: the last folder of a path or handle,
    without a trailing version (`kaggle://google/gemma/keras/gemma_7b_en/3`,
    `/kaggle/input/models/.../gemma_7b_en/3` and `gemma_7b_en` are one)."""
    parts = [part for part in str(preset).rstrip("/").split("/") if part]
    if len(parts) > 1 and parts[-1].isdigit():
        parts = parts[:-1]
    return parts[-1] if parts else str(preset)


def check_adapter_model(settings, path, preset, family):
    """Raises InputError, naming both, when the adapter at `path` was trained
    on another preset or family than the model it is loaded into
    (adapters written before the json recorded them pass)."""
    trained = settings.get("preset")
    if settings.get("family", family) != family or (
        trained and preset_name(trained) != preset_name(preset)
    ):
        raise InputError(
            f"adapter {path} was trained on {trained} ({settings.get('family')}), not on "
            f"model.preset {preset} ({family}); set model.preset={trained} to use it, or give "
            f"an adapter trained on {preset}"
        )


def recovery_format(settings, train_cfg, log=print):
    """(template, sequence_length, max_response_tokens) the adapter was
    trained with (`train_cfg`'s where its json does not say), each one that
    differs from `train_cfg` said in the log."""
    chosen = []
    for key in RECOVERY_FORMAT:
        configured = getattr(train_cfg, key)
        value = settings.get(key, configured)
        if value != configured:
            shown = "its own" if key == "template" else value
            log(f"the adapter was trained with train.{key} {shown}, not the config's; using it")
        chosen.append(value)
    return tuple(chosen)


def load_adapter(causal_lm, path, preset):
    """Enables LoRA as the adapter was trained and loads its weights, once
    `check_adapter_model` agrees that it was trained on `preset`; returns
    how the hosts got it and its json (see `save_adapter`). Every host reads
    its own copy (a run on a bucket gives each one: see
    RunDir.predict_adapter) and keeps its shards; only when some host of a
    pod lacks the file does process 0 send it to all."""
    import tempfile

    from pipeline.parallel import hosts
    from pipeline.run.config import LoraConfig

    def read():
        if not Path(path).exists():
            raise MissingInputError(
                f"adapter {path} not found; run the finetune stage first (it writes best.lora.h5 "
                "when it evaluates: train.eval_rows > 0 and validation rows) or set "
                "predict.adapter"
            )
        return json.loads(adapter_settings_path(Path(path)).read_text()), Path(path).read_bytes()

    if all(hosts.all_processes(Path(path).exists())):
        (settings, weights), how = read(), "read by every host"
    else:
        (settings, weights), how = hosts.share_from_main(read), "sent by process 0"
    check_adapter_model(settings, path, preset, family_of(causal_lm).name)
    lora = {key: settings[key] for key in ("rank", "alpha", "target_layers")}
    enable_lora(causal_lm, LoraConfig(**lora))
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "adapter.lora.h5"
        copy.write_bytes(weights)
        causal_lm.backbone.load_lora_weights(str(copy))
    return how, settings
