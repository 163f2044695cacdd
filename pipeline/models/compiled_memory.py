"""What XLA says a model's programs take per device, from shapes alone.

One training step (the finetune stage's own: `compile_lora_training`, then
Keras' `train_step`, LoRA factors, AdamW moments and all) and one decoding
call (the stages' decoder, `CachedDecoder`) are lowered with
`jax.ShapeDtypeStruct` arguments (each variable's shape, dtype and the
sharding the distribution gives it) and compiled for the devices of the
mesh; XLA's memory analysis then gives what one device holds. The programs
read no weight. Keras does initialise the variables of the model it builds
(it does so on leaving any `StatelessScope`), so a real architecture is
compiled at a few layers (`figures_at_full_depth`), on a sharded mesh or,
for a data-parallel one, built on one device: either way the cut model's
size once (`make plan-check`).

Example:
```python
spec = ModelSpec(FAMILIES["mistral"], FAMILIES["mistral"].architectures["mistral_7b"])
compiled = compile_programs(cfg, spec)  # cfg: the target's config (mesh, batch, lengths)
compiled.training.gib, compiled.generation.gib, compiled.training.collectives
```
"""

import dataclasses
import gc
import re
from collections import Counter

import jax
import keras
import numpy as np

from pipeline.models.decoding import CachedDecoder, model_state
from pipeline.models.lora_training import compile_lora_training
from pipeline.models.model import enable_lora, forward_inputs, model_distribution
from pipeline.parallel.distribution import without_distribution

GIB = 2**30
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """One compiled program, per device: arguments, outputs and temporaries
    (outputs that reuse donated arguments counted once), and how many of
    each collective its HLO holds."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    collectives: dict

    @property
    def bytes(self):
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def gib(self):
        return self.bytes / GIB


@dataclasses.dataclass(frozen=True)
class CompiledPrograms:
    training: CompiledProgram
    generation: CompiledProgram


def compile_programs(cfg, spec):
    """The training step and the decoding call of the model `spec` under
    `cfg` (its mesh, dtype, LoRA, batch sizes and lengths), compiled from
    shapes on the devices JAX has."""
    distribution = model_distribution(
        cfg.distribution, spec, [cfg.train.batch_size, cfg.predict.batch_size]
    )
    replicated = isinstance(distribution, keras.distribution.DataParallel)
    # A data-parallel model is built on one device, its weights there once
    # rather than on every device; its programs take the replicated
    # shardings all the same. A sharded one is built in the distribution,
    # whose layouts its optimizer's variables take from the weights.
    with without_distribution() if replicated else distribution.scope():
        causal_lm = random_causal_lm(spec, cfg)
    with distribution.scope():
        programs = CompiledPrograms(
            compiled_program(training_step(causal_lm, cfg, spec.family)),
            compiled_program(decoding_call(causal_lm, cfg)),
        )
    # The model's weights (gigabytes at 7B width) go before the next one is built.
    del causal_lm
    jax.clear_caches()
    gc.collect()
    return programs


def random_causal_lm(spec, cfg):
    """The family's CausalLM of `spec`'s config (random weights), LoRA and
    optimizer on, metrics built."""
    import keras_hub

    from pipeline import keras_internals

    models = keras_hub.models
    backbone = getattr(models, spec.family.backbone_class)(**spec.config, dtype=cfg.model.dtype)
    causal_lm = getattr(models, spec.family.causal_lm_class)(backbone=backbone, preprocessor=None)
    enable_lora(causal_lm, cfg.lora)
    compile_lora_training(causal_lm, cfg.train)
    keras_internals.build_metrics(causal_lm, *training_batch(cfg, spec.family))
    return causal_lm


def training_batch(cfg, family):
    """(x, y, sample_weight) of one global training batch, zeros."""
    ids = np.zeros((cfg.train.batch_size, cfg.train.sequence_length), "int32")
    x = forward_inputs(family, {"token_ids": ids, "padding_mask": ids.astype(bool)})
    return x, ids, ids.astype("float32")


def abstract(variable):
    """A variable as an argument of a program to lower: its shape, dtype and
    the sharding the distribution gives it."""
    layout = keras.distribution.distribution().get_variable_layout(variable)
    sharding = layout.backend_layout if layout is not None else None
    return jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=sharding)


def batch_argument(shape, dtype):
    from pipeline.parallel.distribution import data_sharding

    return jax.ShapeDtypeStruct(shape, dtype, sharding=data_sharding(shape))


def training_step(causal_lm, cfg, family):
    """Keras' `train_step` (what `fit` runs), lowered for one global batch
    of `train.batch_size` rows of `train.sequence_length` tokens."""
    x, y, weight = training_batch(cfg, family)
    data = tuple(
        jax.tree.map(lambda value: batch_argument(value.shape, value.dtype), part)
        for part in (x, y, weight)
    )
    state = (
        [abstract(v) for v in causal_lm.trainable_variables],
        [abstract(v) for v in causal_lm.non_trainable_variables],
        [abstract(v) for v in causal_lm.optimizer.variables],
        [abstract(v) for v in causal_lm.metrics_variables],
    )
    return jax.jit(causal_lm.train_step, donate_argnums=0).lower(state, data)


def decoding_call(causal_lm, cfg):
    """The stages' decoder (`CachedDecoder`) on one batch of
    `predict.batch_size` prompts of `train.sequence_length` tokens and
    `predict.max_new_tokens` more."""
    length = cfg.train.sequence_length + cfg.predict.max_new_tokens
    shape = (cfg.predict.batch_size, length)
    decoder = CachedDecoder(causal_lm, stop_token_ids=[1])
    state = model_state(causal_lm, read=abstract)
    return decoder.lower(
        batch_argument(shape, "int32"),
        batch_argument(shape, "bool"),
        cfg.predict.max_new_tokens,
        state=state,
    )


def compiled_program(lowered):
    compiled = lowered.compile()
    stats = compiled.memory_analysis()
    return CompiledProgram(
        stats.argument_size_in_bytes,
        stats.output_size_in_bytes,
        stats.temp_size_in_bytes,
        stats.alias_size_in_bytes,
        count_collectives(compiled.as_text()),
    )


def count_collectives(hlo_text):
    """{collective: how many} in a compiled program's HLO (the `-start` of an
    asynchronous one counted, its `-done` not)."""
    return {
        name: n
        for name in COLLECTIVES
        if (n := len(re.findall(rf"\s{name}(?:-start)?\(", hlo_text)))
    }


@dataclasses.dataclass(frozen=True)
class Figures:
    """Per-device bytes of the training step and the decoding call, and the
    collectives of each, at a model's full depth."""

    training_bytes: float
    generation_bytes: float
    training_collectives: dict
    generation_collectives: dict
    depths: tuple  # the depths compiled (one: the full depth itself)


def figures_at_full_depth(cfg, spec, depths=None):
    """XLA's figures for `spec`, drawn from cut models on to its own blocks
    (weights, LoRA state, activations and KV cache grow by block; so do the
    collectives): a cut of `depths[0]` blocks of each kind, and for each
    kind one with `depths[1]` of it, the kinds as the family tells them
    (`ModelSpec.block_kinds`: one for most; Gemma 4's local and global, own
    and shared key/value blocks). The training step grows by block exactly;
    the decoding call's draw is an upper bound, since XLA reuses the prompt
    pass's buffers from layer to layer (tests/test_compiled_memory.py). A
    model with at most `depths[1]` blocks of each kind is compiled as it is.
    By default (2, 4) blocks of one kind, (1, 2) of several: a model of one
    block is no model like the others, one block of each of several kinds
    is."""
    counts = Counter(spec.block_kinds())  # in the model's order
    low, high = depths or ((2, 4) if len(counts) == 1 else (1, 2))
    if max(counts.values()) <= high:
        compiled = compile_programs(cfg, spec)
        return Figures(
            compiled.training.bytes,
            compiled.generation.bytes,
            compiled.training.collectives,
            compiled.generation.collectives,
            (sum(counts.values()),),
        )
    base_counts = dict.fromkeys(counts, low)
    base = compile_programs(cfg, cut_blocks(spec, base_counts))
    steps = {
        kind: compile_programs(cfg, cut_blocks(spec, {**base_counts, kind: high}))
        for kind in counts
    }
    share = {kind: (n - low) / (high - low) for kind, n in counts.items()}

    def drawn(figure):
        return figure(base) + sum(share[k] * (figure(steps[k]) - figure(base)) for k in counts)

    def collectives(program):
        names = {name for c in (base, *steps.values()) for name in program(c)}
        counts = {name: round(drawn(lambda c, n=name: program(c).get(n, 0))) for name in names}
        # XLA's collective-permutes do not all grow by block: a count drawn to 0 or below is none.
        return {name: n for name, n in counts.items() if n > 0}

    return Figures(
        drawn(lambda c: c.training.bytes),
        drawn(lambda c: c.generation.bytes),
        collectives(lambda c: c.training.collectives),
        collectives(lambda c: c.generation.collectives),
        (low, high),
    )


def cut_blocks(spec, counts):
    """`spec` with `counts[kind]` blocks of each kind, in the model's order."""
    return spec.cut([kind for kind, n in counts.items() for _ in range(n)])
