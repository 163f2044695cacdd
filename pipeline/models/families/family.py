"""What the pipeline needs from a model family, as plain data.

A `Family` names the KerasHub classes of a family and holds what differs
between families: the chat format of a rewrite request and the token that
ends the model's turn, the weights the layout map shards (as plain data, so
that mesh checks and memory plans need no devices), published architectures
for plans and random-weight runs, and the tiny stand-in's architecture. One
module per family in this folder fills one in; `registry.FAMILIES` lists
them.

Example:
```python
spec = ModelSpec(registry.by_backbone_class("MistralBackbone"), backbone_config)
spec.dims.num_layers, spec.weight_dims()["token_embedding/embeddings"]
spec.family.layout_axes("batch", "model")
```
"""

import dataclasses
from collections.abc import Callable
from typing import Optional

from pipeline.errors import InputError


@dataclasses.dataclass(frozen=True)
class Dimensions:
    """A backbone's sizes under one set of names, whatever its config calls
    them (`ffw_dim` is the width of each of the two gating projections)."""

    vocabulary_size: int
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    hidden_dim: int
    head_dim: int
    ffw_dim: int


@dataclasses.dataclass(frozen=True)
class TransformersFormat:
    """A family in transformers' terms.

    Args:
        architecture: transformers' class of the model (config.json's
            `architectures`; vLLM reads it).
        weights: ((Keras weight path, transformers name, kind), ...), `{i}`
            standing for the decoder block's index in both; `kind` says how
            the Keras value becomes transformers' (`stages.export.hf_weight`).
            Every weight of the backbone must have one.
        config: backbone config -> transformers config.json; None: KerasHub's
            exporter writes it.
        tokenizer: "keras_hub" (KerasHub's exporter writes the files, then
            transformers converts them to tokenizer.json) or "byte_level_bpe"
            (tokenizer.json written from the vocabulary and merges).
        tokenizer_config: tokenizer_config.json where `tokenizer` is
            "byte_level_bpe" (else KerasHub writes it).
        base_models: {KerasHub preset: the Hugging Face model it was
            converted from}, named in the PEFT adapter.
    """

    architecture: str
    weights: tuple
    config: Callable | None = None
    tokenizer: str = "keras_hub"
    tokenizer_config: dict | None = None
    base_models: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family as the pipeline runs it.

    Args:
        name: the family's name in messages and the docs (`gemma3`).
        backbone_class / causal_lm_class / tokenizer_class: KerasHub's
            class names (`class_name` in a preset's config.json).
        chat_turn: one user turn, then the start of the model's turn, with
            `{content}` for the request (what the instruct model expects).
        end_of_turn: the token that ends the model's turn, where it is not
            the tokenizer's end token (None: the end token ends it).
        dimensions: backbone config -> `Dimensions`.
        weight_dims: backbone config -> {weight path: [(config field, size)
            of each dimension]} of every matrix of the backbone, block by
            block (the paths the layout map matches; blocks may differ, as
            Gemma 4's do).
        layout_axes: (data axis, model axis) -> {weight-path regex: mesh
            axis of each dimension}, as Keras' `LayoutMap` reads it.
        architectures: {name: backbone config} of published models, for
            plans and random-weight runs (no download).
        tiny_config: the tiny stand-in's backbone config (every sharded
            dimension divides by 8).
        presets: KerasHub presets of the family (docs/models.md).
        transformers: how the export stage writes the family in Hugging
            Face transformers' format (`TransformersFormat`); None where it
            is not built (and so no Kaggle bundle).
        transformers_variant: backbone config -> the `TransformersFormat`
            of that variant of the family, where it is not `transformers`
            (Gemma 2 in the Gemma family); see `transformers_format`.
        check_config: backbone config -> None, raising `InputError` for a
            variant the pipeline does not run (a vision tower, experts).
        text_only_config: backbone config overrides that leave the preset's
            vision and audio towers out when it is loaded (their weights are
            not read); empty where the family's presets have text ones.
        position_ids: whether the backbone takes `position_ids` besides
            token ids and padding mask (`model.forward_inputs` adds them).
        lora_targets: the Keras layer names of a block's seven projections
            (query, key, value, attention output; the feed-forward's gate,
            up and down), which LoRA adapts when `lora.target_layers` is
            null, the default.
        cache_shapes: backbone config -> [(key/value heads, head_dim) of
            each block's key/value cache, or None for a block that reads
            another's]; None where every block has one of the `dimensions`'
            sizes (see `ModelSpec.cache_shapes`).
        block_kinds: backbone config -> [the kind of each block] (blocks of
            a kind hold the same weights and cache and do the same work),
            for a family whose blocks differ; None: they are all alike.
        cut_blocks: (backbone config, [kind of each block]) -> the config
            of a model of those blocks alone, in that order (a kind's blocks
            after those of the kinds before it in the model); with
            `block_kinds` (`make plan-check` compiles such cuts).
    """

    name: str
    backbone_class: str
    causal_lm_class: str
    tokenizer_class: str
    chat_turn: str
    end_of_turn: str | None
    dimensions: Callable
    weight_dims: Callable
    layout_axes: Callable
    architectures: dict
    tiny_config: dict
    presets: tuple
    transformers: Optional["TransformersFormat"] = None
    transformers_variant: Callable | None = None
    check_config: Callable = lambda config: None
    text_only_config: dict = dataclasses.field(default_factory=dict)
    position_ids: bool = False
    lora_targets: tuple = ()
    cache_shapes: Callable | None = None
    block_kinds: Callable | None = None
    cut_blocks: Callable | None = None

    def transformers_format(self, config):
        """The `TransformersFormat` of a backbone config of the family."""
        return self.transformers_variant(config) if self.transformers_variant else self.transformers


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model as its config.json describes it: its family and its backbone
    config (no weights)."""

    family: Family
    config: dict

    @property
    def dims(self):
        return self.family.dimensions(self.config)

    def weight_dims(self):
        return self.family.weight_dims(self.config)

    def cache_shapes(self):
        """[(key/value heads, head_dim) of each block's key/value cache, or
        None for a block that attends to another block's]."""
        if self.family.cache_shapes:
            return self.family.cache_shapes(self.config)
        d = self.dims
        return [(d.num_key_value_heads, d.head_dim)] * d.num_layers

    def block_kinds(self):
        """The kind of each block; one kind where the family's blocks are
        alike."""
        if self.family.block_kinds:
            return self.family.block_kinds(self.config)
        return ["block"] * self.dims.num_layers

    def cut(self, kinds):
        """This model with blocks of `kinds` alone (the kinds of
        `block_kinds`, in the model's order)."""
        if self.family.cut_blocks:
            return dataclasses.replace(self, config=self.family.cut_blocks(self.config, kinds))
        return dataclasses.replace(self, config=dict(self.config, num_layers=len(kinds)))

    def lora_targets(self, configured=None):
        """The layer names LoRA adapts: `configured` (`lora.target_layers`),
        or the family's seven projections when it is None; raises InputError
        for a name no layer of the model has, naming the family's."""
        targets = list(self.family.lora_targets if configured is None else configured)
        layers = {path.split("/")[-2] for path in self.weight_dims()}
        unknown = [name for name in targets if name not in layers]
        if unknown or not targets:
            raise InputError(
                f"lora.target_layers: {', '.join(unknown) or 'none given'}: no such layer in a "
                f"{self.family.name} model, whose projections are "
                f"{', '.join(self.family.lora_targets)} (lora.target_layers=null adapts all "
                "seven)"
            )
        return targets
