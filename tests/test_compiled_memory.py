"""XLA's figures for a model compiled from shapes (`make plan-check`): what
the arguments of its programs hold, the draw from a cut model to a deeper
one, the collectives counted."""

import dataclasses

import pytest
from specs import GEMMA_TINY

from pipeline.models.compiled_memory import (
    compile_programs,
    count_collectives,
    cut_blocks,
    figures_at_full_depth,
)
from pipeline.models.families.family import ModelSpec
from pipeline.models.families.registry import FAMILIES
from pipeline.models.memory import (
    LORA_DTYPE_BYTES,
    activation_bytes_per_row,
    lora_parameter_count,
    plan_memory,
)
from pipeline.run.config import load_config


@pytest.fixture(scope="module")
def cfg():
    """The embedded default's run on the session's (1, 8) mesh, short rows."""
    return load_config(
        None,
        [
            "distribution.mesh_shape=[1,8]",
            "train.sequence_length=64",
            "predict.max_new_tokens=8",
            "predict.batch_size=8",
        ],
    )


@pytest.mark.parametrize("mesh", [[1, 8], [8, 1]])
def test_training_step_arguments_are_the_planned_weights_and_lora_state(cfg, mesh):
    """The step's arguments on one device: the frozen weights, the LoRA
    factors and their two AdamW moments (their gradients are temporaries),
    and the batch; sharded on a model axis, whole on every device of a
    data-parallel mesh."""
    cfg = dataclasses.replace(
        cfg, distribution=dataclasses.replace(cfg.distribution, mesh_shape=mesh)
    )
    training = compile_programs(cfg, GEMMA_TINY).training
    plan = plan_memory(cfg, GEMMA_TINY)
    sharded = mesh[1] > 1  # else DataParallel: every weight whole on every device
    lora = lora_parameter_count(
        GEMMA_TINY,
        cfg.lora,
        GEMMA_TINY.family.layout_axes("batch", "model") if sharded else {},
        {"batch": mesh[0], "model": mesh[1]},
    )
    # ids, padding mask, labels, sample weights of the device's rows
    batch = cfg.train.batch_size // mesh[0] * cfg.train.sequence_length * (4 + 1 + 4 + 4)
    expected = plan.frozen + 3 * lora * LORA_DTYPE_BYTES + batch
    assert training.argument_bytes == pytest.approx(expected, rel=0.001)  # + the step counters


def test_a_deeper_model_is_drawn_from_two_cut_ones(cfg):
    """Figures from 2 and 3 layers drawn on to 4: the training step is what
    the 4-layer model compiles to (it grows by layer exactly), the decoding
    call a bound a little above it (XLA reuses the prompt pass's buffers
    from layer to layer; only the cache and the kernel copies grow). 8%
    above here: the tiny model's prompt pass (16 heads' scores over the
    whole prompt) weighs more against its cache than a real model's."""
    four = cut_blocks(GEMMA_TINY, {"block": 4})
    drawn = figures_at_full_depth(cfg, four, depths=(2, 3))
    compiled = compile_programs(cfg, four)
    assert drawn.depths == (2, 3)
    assert drawn.training_bytes == pytest.approx(compiled.training.bytes, rel=0.001)
    assert compiled.generation.bytes <= drawn.generation_bytes < 1.1 * compiled.generation.bytes
    assert drawn.training_collectives == compiled.training.collectives
    shallow = figures_at_full_depth(cfg, cut_blocks(GEMMA_TINY, {"block": 3}), depths=(2, 3))
    assert shallow.depths == (3,)  # no deeper than a cut: compiled as it is


@pytest.mark.slow
def test_a_model_of_several_kinds_of_block_is_drawn_kind_by_kind(cfg):
    """Gemma 4's blocks differ (local and global; their own keys and values,
    or an earlier block's): a 7-block tiny Gemma 4, drawn from a cut of one
    block of each kind and one more of each kind in turn, comes to what it
    compiles to: the training step within 3% (XLA's buffers do not add up
    block by block quite as for blocks all alike), the decoding call a bound
    up to 10% above."""
    gemma4 = FAMILIES["gemma4"]
    local, full = "sliding_attention", "full_attention"
    seven = ModelSpec(
        gemma4,
        dict(
            gemma4.tiny_config,
            num_layers=7,
            layer_types=[local, local, full, local, local, full, local],
            num_kv_shared_layers=3,
        ),
    )
    drawn = figures_at_full_depth(cfg, seven)
    compiled = compile_programs(cfg, seven)
    assert drawn.depths == (1, 2)
    assert drawn.training_bytes == pytest.approx(compiled.training.bytes, rel=0.03)
    assert compiled.generation.bytes <= drawn.generation_bytes < 1.1 * compiled.generation.bytes


def test_on_a_mesh_of_both_axes_the_plan_counts_the_logits_of_the_data_axiss_rows(cfg):
    """Gemma's layout shards the table's hidden axis over the data axis, so
    XLA gathers the rows of the data axis to the table and every device
    computes their logits over its share of the hidden axis. On a (4, 2)
    mesh with a vocabulary wide enough for the logits to weigh, the plan
    counts four rows' logits for each of a device's own and comes within
    the check's 15% of XLA's training step; counting its own rows only, it
    falls below."""
    wide = ModelSpec(GEMMA_TINY.family, dict(GEMMA_TINY.config, vocabulary_size=32768))
    on_both = load_config(
        None,
        [
            "distribution.mesh_shape=[4,2]",
            "train.sequence_length=128",
            "predict.max_new_tokens=8",
            "predict.batch_size=8",
        ],
    )
    xla = compile_programs(on_both, wide).training.bytes
    plan = plan_memory(on_both, wide)
    assert plan.training == pytest.approx(xla, rel=0.15)
    own_rows_only = (
        plan.activations / plan.activation_per_row * activation_bytes_per_row(wide, 128, 2, 4)
    )
    assert plan.training - plan.activations + own_rows_only < 0.85 * xla


def test_collectives_are_counted_once_each():
    hlo = """
      %ag = f32[8] all-gather-start(f32[1] %p), replica_groups={}
      %agd = f32[8] all-gather-done(%ag)
      %r = f32[8] all-reduce(f32[8] %x), to_apply=%add
      %r2 = f32[8] all-reduce(f32[8] %y), to_apply=%add
      %dot = f32[8] dot(%a, %b)
    """
    assert count_collectives(hlo) == {"all-gather": 1, "all-reduce": 2}


@pytest.mark.slow
def test_the_plan_grows_by_layer_as_xla_does_at_7b_width(cfg):
    """`make plan-check` in small: Mistral 7B's widths (its vocabulary cut,
    which no layer holds), compiled in float32 at 2 and 3 layers (as the
    check draws from 2 and 4: a 1-layer cut is no layer like the others).
    What one more layer adds per device, weights, LoRA state, the kernels with LoRA
    merged and the activations in training, the cache and kernel copies in
    decoding, is the plan's within the check's 15%."""
    mistral = FAMILIES["mistral"]
    spec = ModelSpec(mistral, dict(mistral.architectures["mistral_7b"], vocabulary_size=1024))
    wide = load_config(
        None,
        [
            "distribution.mesh_shape=[1,8]",
            "model.dtype=float32",
            "train.batch_size=2",
            "train.sequence_length=256",
            "predict.batch_size=8",
            "predict.max_new_tokens=32",
        ],
    )
    one, two = (compile_programs(wide, cut_blocks(spec, {"block": n})) for n in (2, 3))
    plan_one, plan_two = (plan_memory(wide, cut_blocks(spec, {"block": n})) for n in (2, 3))
    xla_training = two.training.bytes - one.training.bytes
    xla_generation = two.generation.bytes - one.generation.bytes
    assert plan_two.training - plan_one.training == pytest.approx(xla_training, rel=0.15)
    assert plan_two.generation - plan_one.generation == pytest.approx(xla_generation, rel=0.15)
