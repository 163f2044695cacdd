import jax
import keras
import keras_hub
import numpy as np
import pytest
from specs import GEMMA_TINY

from pipeline.models.decoding import CachedDecoder
from pipeline.models.model import model_distribution
from pipeline.models.tiny import BACKBONE_CONFIG
from pipeline.parallel.runtime import set_seed
from pipeline.run.config import DistributionConfig

LENGTH = 96


def ragged_prompts(rng, lengths, length=LENGTH):
    token_ids = np.zeros((len(lengths), length), "int32")
    padding_mask = np.zeros((len(lengths), length), bool)
    for row, n in enumerate(lengths):
        token_ids[row, :n] = rng.integers(10, BACKBONE_CONFIG["vocabulary_size"], n)
        padding_mask[row, :n] = True
    return token_ids, padding_mask


def random_lm(seed, **overrides):
    set_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(**dict(BACKBONE_CONFIG, **overrides))
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def data_parallel():
    """A scope for models with one key/value head, which the model axis of
    the session's (1, 8) mesh cannot shard."""
    mesh = keras.distribution.DeviceMesh((8,), ["batch"], keras.distribution.list_devices())
    return keras.distribution.DataParallel(device_mesh=mesh, auto_shard_dataset=False).scope()


def keras_hub_tokens(causal_lm, token_ids, padding_mask):
    out = causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
    )
    return np.asarray(out["token_ids"])


def assert_decoder_matches_keras_hub(causal_lm, lengths, seed, max_new_tokens, **decoder_args):
    """Prompts of `lengths`; the decoder's tokens equal KerasHub's greedy
    ones up to each row's bound. Returns the decoded tokens."""
    token_ids, padding_mask = ragged_prompts(np.random.default_rng(seed), lengths)
    expected = keras_hub_tokens(causal_lm, token_ids, padding_mask)
    decoded = CachedDecoder(causal_lm, stop_token_ids=[1], **decoder_args)(
        token_ids, padding_mask, max_new_tokens
    )
    for row, n in enumerate(lengths):
        end = min(n + max_new_tokens, LENGTH)
        np.testing.assert_array_equal(decoded[row, :end], expected[row, :end], err_msg=f"row {row}")
    return decoded


@pytest.fixture(scope="module")
def sharded_lora_lm(tiny_model):
    """Random weights on the (1, 8) mesh (set up by `tiny_model`), with LoRA
    factors that are not zero, so the adapter changes what is generated."""
    causal_lm = random_lm(1)
    causal_lm.backbone.enable_lora(4)
    rng = np.random.default_rng(1)
    for variable in causal_lm.trainable_variables:
        if "lora_kernel_b" in variable.path:
            variable.assign(rng.normal(scale=0.5, size=variable.shape))
    return causal_lm


def test_greedy_tokens_match_keras_hub_on_the_sharded_model_with_lora(sharded_lora_lm):
    assert_decoder_matches_keras_hub(
        sharded_lora_lm, [3, 17, 30, 30, 41, 8, 25, 12], seed=0, max_new_tokens=40
    )


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_matches_keras_hub(kv_heads):
    """Gemma 2B's shape: fewer key/value heads than query heads (one, in
    2B), which the model axis cannot shard: data parallel, as the
    distribution check advises for 2B on 8 devices."""
    with data_parallel():
        assert_decoder_matches_keras_hub(
            random_lm(3, num_key_value_heads=kv_heads),
            [7, 19, 26, 4, 30, 12, 9, 21],
            seed=3,
            max_new_tokens=30,
        )


def test_gemma_2_style_blocks_match_keras_hub():
    causal_lm = random_lm(
        2,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=16,
        query_head_dim_normalize=False,
    )
    assert_decoder_matches_keras_hub(
        causal_lm, [20, 5, 33, 11], seed=2, max_new_tokens=50, max_spans=7
    )


def test_on_the_model_parallel_mesh_decoding_gathers_only_the_argmax_candidates(sharded_lora_lm):
    """On the (1, 8) mesh the heads are sharded; the caches and attention
    keep them so. A cache laid out batch first once made every step gather
    queries and caches across devices (4x slower). What remains gathered is
    each device's best token and logit for its share of the vocabulary."""
    import re

    token_ids, padding_mask = ragged_prompts(np.random.default_rng(0), [5, 9, 30, 12, 7, 3, 22, 16])
    text = (
        CachedDecoder(sharded_lora_lm, stop_token_ids=[1])
        .lower(token_ids, padding_mask, 16)
        .compile()
        .as_text()
    )
    gathered = re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\S* all-(?:gather|to-all)\(", text)
    assert gathered and set(gathered) == {"8,8"}  # (rows, devices)


def test_on_a_mesh_of_both_axes_each_device_holds_an_eighth_of_the_cache():
    """A (2, 4) mesh (the v6e-8 config's): the cache, and with it the
    attention, is split over both axes. XLA alone kept every row of a
    device's heads on it, twice the cache and the attention scores each
    device needed. The tokens stay KerasHub's."""
    distribution = model_distribution(DistributionConfig(mesh_shape=[2, 4]), GEMMA_TINY, [8])
    with distribution.scope():
        causal_lm = random_lm(4)
        assert_decoder_matches_keras_hub(
            causal_lm, [12, 30, 5, 44, 20, 9, 61, 17], seed=4, max_new_tokens=24
        )
        decoder = CachedDecoder(causal_lm, stop_token_ids=[1])
        key_cache = jax.jit(lambda: decoder.empty_caches(8, 64))()[0][0]
    heads_by_rows = BACKBONE_CONFIG["num_key_value_heads"] * 8
    assert key_cache.sharding.shard_shape(key_cache.shape)[0] == heads_by_rows // 8


def test_decoding_ends_at_max_new_tokens_after_the_longest_prompt(sharded_lora_lm):
    lengths = [10, 25, 4]
    decoded = assert_decoder_matches_keras_hub(sharded_lora_lm, lengths, seed=3, max_new_tokens=12)
    assert (decoded[:, max(lengths) + 12 :] == 0).all()  # nothing written past the last row's bound


def test_the_batch_ends_once_every_row_has_stopped(sharded_lora_lm):
    lengths = [10, 14, 12]
    token_ids, padding_mask = ragged_prompts(np.random.default_rng(4), lengths)
    expected = keras_hub_tokens(sharded_lora_lm, token_ids, padding_mask)
    # Stop on whatever each row writes first: every row ends after one token.
    first_tokens = [int(expected[row, n]) for row, n in enumerate(lengths)]
    decoded = CachedDecoder(sharded_lora_lm, stop_token_ids=first_tokens)(
        token_ids, padding_mask, max_new_tokens=60
    )
    for row, n in enumerate(lengths):
        assert decoded[row, n] == first_tokens[row]
    assert (decoded[:, max(lengths) + 1 :] == 0).all()


def test_prompts_longer_than_the_prefill_are_fed_on_not_skipped(sharded_lora_lm):
    # length 96 - 40 new tokens: the prefill covers 56 positions, every prompt is longer.
    assert_decoder_matches_keras_hub(sharded_lora_lm, [60, 70, 81], seed=5, max_new_tokens=40)


def test_bfloat16_rows_end_at_a_stop_token_as_in_keras_hub():
    """The pipeline stops at <end_of_turn> and <eos>; any stop id works the
    same way, so the stop here is the token row 0 writes third (a random
    model rarely writes a given id)."""
    import keras

    keras.config.set_dtype_policy("bfloat16")
    try:
        causal_lm = random_lm(6)
    finally:
        keras.config.set_dtype_policy("float32")
    lengths = [9, 22, 15, 30]
    token_ids, padding_mask = ragged_prompts(np.random.default_rng(6), lengths)
    stop = int(keras_hub_tokens(causal_lm, token_ids, padding_mask)[0, lengths[0] + 2])
    expected = np.asarray(
        causal_lm.generate(
            {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=[stop]
        )["token_ids"]
    )
    decoded = CachedDecoder(causal_lm, stop_token_ids=[stop])(
        token_ids, padding_mask, max_new_tokens=40
    )
    for row, n in enumerate(lengths):
        generated = list(expected[row, n : n + 40])
        end = n + (generated.index(stop) + 1 if stop in generated else 40)
        np.testing.assert_array_equal(decoded[row, :end], expected[row, :end], err_msg=f"row {row}")
    assert decoded[0, lengths[0] + 2] == stop


def test_a_stop_token_inside_a_prompt_does_not_end_the_row(sharded_lora_lm):
    lengths = [5, 30]  # row 1's prompt is fed on, one position at a time, after row 0's
    token_ids, padding_mask = ragged_prompts(np.random.default_rng(7), lengths)
    expected = keras_hub_tokens(sharded_lora_lm, token_ids, padding_mask)
    generated = set(expected[1, 30:50].tolist())
    stop = next(int(t) for t in token_ids[1, 6:30] if t not in generated)  # in the prompt only
    decoded = CachedDecoder(sharded_lora_lm, stop_token_ids=[stop])(
        token_ids, padding_mask, max_new_tokens=20
    )
    np.testing.assert_array_equal(decoded[1, :50], expected[1, :50])


def test_lora_is_merged_into_each_kernel_once_per_call_not_per_step(sharded_lora_lm, monkeypatch):
    """Keras' EinsumDense adds A @ B to its kernel every time it runs; in the
    decoding loops that would rebuild every adapted kernel at every step."""
    import keras

    kernel = keras.layers.EinsumDense.kernel
    reads = []
    monkeypatch.setattr(
        keras.layers.EinsumDense,
        "kernel",
        property(lambda layer: reads.append(layer) or kernel.fget(layer)),
    )
    token_ids, padding_mask = ragged_prompts(np.random.default_rng(0), [5, 9])
    CachedDecoder(sharded_lora_lm, stop_token_ids=[1])(token_ids, padding_mask, 8)
    backbone = sharded_lora_lm.backbone
    assert len(reads) == 7 * backbone.num_layers and len(set(map(id, reads))) == len(reads)
