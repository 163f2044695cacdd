"""The one door to Keras' insides: only `pipeline/keras_internals.py` names a
private Keras, KerasHub or JAX symbol, or reads the internals of a layer
KerasHub does not export (its decoder blocks and attention layers)."""

import ast
import contextlib
import sys
from pathlib import Path

import keras
import keras_hub
import numpy as np
import pytest
from processes import ROOT

PACKAGE = ROOT / "pipeline"
DOOR = PACKAGE / "keras_internals.py"
PRIVATE_MODULES = ("keras.src", "keras_hub.src", "jax._src", "jaxlib")
DOCUMENTED_PRIVATE = {"os._exit"}  # Python's own API, underscore and all


def test_private_keras_names_refuse_other_versions():
    from pipeline.keras_internals import check_versions

    check_versions({"keras": "3.15.1", "keras-hub": "0.32.0"})
    with pytest.raises(
        ImportError, match=r"supports keras 3\.15\.x and keras-hub 0\.32\.x .* found keras 3\.16\.0"
    ):
        check_versions({"keras": "3.16.0", "keras-hub": "0.32.0"})


def outside_the_door():
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path != DOOR]


@pytest.mark.parametrize(
    "path", outside_the_door(), ids=lambda path: str(path.relative_to(PACKAGE))
)
def test_no_module_but_the_door_names_a_private_symbol(path):
    """No `keras.src` / `keras_hub.src` / `jax._src` import and no `x._name`
    read of any object but the module's own (`self`, `cls`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
            )
            found += [name for name in names if name.startswith(PRIVATE_MODULES)]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            text = ast.unparse(node)
            if ast.unparse(node.value) not in ("self", "cls") and text not in DOCUMENTED_PRIVATE:
                found.append(text)
    assert not found


def public_classes():
    namespaces = (
        keras,
        keras.layers,
        keras.models,
        keras_hub.layers,
        keras_hub.models,
        keras_hub.tokenizers,
    )
    return {
        value
        for namespace in namespaces
        for value in vars(namespace).values()
        if isinstance(value, type)
    }


@contextlib.contextmanager
def reads_from_the_pipeline(classes):
    """Records 'Class.attribute in file' for every attribute the pipeline's
    modules (the door aside) read from an instance of `classes`, a
    {class: names allowed} map."""
    reads = []
    patched = []
    for cls, allowed in classes.items():
        original = cls.__getattribute__

        def spy(obj, name, original=original, allowed=allowed):
            caller = sys._getframe(1).f_code.co_filename
            if (
                caller.startswith(str(PACKAGE))
                and caller != str(DOOR)
                and not name.startswith("__")
                and name not in allowed
            ):
                reads.append(f"{type(obj).__name__}.{name} in {Path(caller).relative_to(ROOT)}")
            return original(obj, name)

        patched.append((cls, "__getattribute__" in vars(cls), original))
        cls.__getattribute__ = spy
    try:
        yield reads
    finally:
        for cls, own, original in patched:
            if own:
                cls.__getattribute__ = original
            else:
                del cls.__getattribute__


def test_only_the_door_reads_the_internals_of_keras_hub_layers(tiny, tmp_path):
    """Loading, LoRA, a training step, decoding, its cost analysis, the
    adapter and the transformers export, watched: the pipeline reads no
    attribute of a layer class KerasHub does not export (decoder blocks,
    attention, norms), and of the backbone and the task only their class's
    API and their config's keys."""
    from pipeline.models.decoding import CachedDecoder
    from pipeline.models.decoding_cost import step_bytes_accessed, step_floor_bytes
    from pipeline.models.lora_training import compile_lora_training
    from pipeline.models.model import enable_lora, load_model, save_adapter
    from pipeline.run.config import load_config
    from pipeline.stages.export import write_peft_adapter, write_transformers_model

    cfg = load_config(None, [f"model.preset={tiny.preset}"])
    causal_lm, tokenizer = load_model(cfg, [8])
    backbone = causal_lm.backbone
    public = public_classes()
    watched = {
        type(layer): set()
        for layer in backbone._flatten_layers(include_self=False)
        if type(layer) not in public
    }
    assert {cls.__name__ for cls in watched} >= {"GemmaDecoderBlock", "CachedGemmaAttention"}
    for model in (backbone, causal_lm):
        watched[type(model)] = set(dir(type(model))) | set(model.get_config())
    ids = np.ones((8, 24), "int32")
    mask = np.arange(24)[None, :] < np.arange(8, 24, 2)[:, None]
    with reads_from_the_pipeline(watched) as reads:
        enable_lora(causal_lm, cfg.lora)
        compile_lora_training(causal_lm, cfg.train)
        x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
        causal_lm.train_on_batch(x, ids[:, 1:], sample_weight=mask[:, 1:].astype("float32"))
        decoder = CachedDecoder(causal_lm, stop_token_ids=[1])
        decoder(ids, mask, max_new_tokens=4)
        step_bytes_accessed(decoder, 8, 24), step_floor_bytes(decoder, 8, 24)
        save_adapter(causal_lm, cfg, tmp_path / "adapter.lora.h5")
        write_transformers_model(causal_lm, tokenizer, tmp_path / "transformers", "float32")
        write_peft_adapter(backbone, tmp_path / "peft", "base")
    assert not sorted(set(reads))
