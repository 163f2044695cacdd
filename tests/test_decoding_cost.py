"""The bytes a decoding step moves (XLA's count) against the floor any
decoder must read: the figures `make bench` reports."""

import keras_hub
import pytest
from test_decoding import data_parallel, random_lm

from pipeline.models.decoding import CachedDecoder
from pipeline.models.decoding_cost import step_bytes_accessed, step_floor_bytes
from pipeline.models.families.registry import FAMILIES
from pipeline.models.tiny import BACKBONE_CONFIG


@pytest.mark.parametrize("query_heads, kv_heads, head_dim", [(16, 8, 64), (8, 1, 256)])
def test_a_decoding_step_reads_the_cache_once(query_heads, kv_heads, head_dim):
    """The bytes of a step grow with the cache length as the cache does: the
    attention reads the cache in place (a transposed copy would triple it).
    With one key/value head (Gemma 2B's shape, heads as 2B's) a cache
    axis of one entry once made XLA copy the whole cache at every step."""
    with data_parallel():
        heads = dict(num_query_heads=query_heads, num_key_value_heads=kv_heads, head_dim=head_dim)
        decoder = CachedDecoder(random_lm(0, **heads), stop_token_ids=[1])
    growth = step_bytes_accessed(decoder, 32, 1280) - step_bytes_accessed(decoder, 32, 640)
    floor_growth = step_floor_bytes(decoder, 32, 1280) - step_floor_bytes(decoder, 32, 640)
    # layers x (key, value) x rows x positions x kv heads x dims x bytes
    layers = BACKBONE_CONFIG["num_layers"]
    assert floor_growth == layers * 2 * 32 * 640 * kv_heads * head_dim * 4
    assert floor_growth <= growth < 1.2 * floor_growth


def test_a_decoding_step_at_one_row_reads_the_weights_once(tiny_model):
    """One row, a short cache: the weights dominate, and a step reads each
    once: the kernels in the layouts the products want (no copy of the
    attention output's), the table once for the logits and one row of it
    for the lookup (XLA may count a gather as its whole table, so
    `step_bytes_accessed` counts the rows itself)."""
    causal_lm, _ = tiny_model
    decoder = CachedDecoder(causal_lm, stop_token_ids=[1])
    assert 0.99 < step_bytes_accessed(decoder, 1, 16) / step_floor_bytes(decoder, 1, 16) < 1.05


def test_a_decoding_step_of_the_tiny_model_passes_over_its_attention_scores_a_few_times(
    tiny_model,
):
    """The figure `make bench` reports: 32 rows, 640 positions. The tiny
    model's 16-wide heads, two queries to a key/value head, make the
    attention scores a sixteenth of the cache they are computed from (at
    Gemma 7B's 256-wide heads a 512th), so each pass over them counts: the
    bytes above the floor are under 9 such passes (8 measured; the
    softmax's division after the value product saves one, and a copy of
    the cache would add 16)."""
    causal_lm, _ = tiny_model
    decoder = CachedDecoder(causal_lm, stop_token_ids=[1])
    rows, positions = 32, 640
    above_floor = step_bytes_accessed(decoder, rows, positions) - step_floor_bytes(
        decoder, rows, positions
    )
    config = causal_lm.backbone.get_config()
    scores = config["num_layers"] * rows * config["num_query_heads"] * positions * 4
    assert above_floor < 9 * scores


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_familys_step_reads_its_weights_once(name):
    """Each family's step, at one row and a short cache: the kernels in the
    layouts the products want (Llama's are hidden first already, Gemma's
    are laid out so once per call), the logits' table once (an untied
    model's input table, and Gemma 4's per-layer one, only by the rows it
    looks up), the norms and the gate's activation adding no pass over a
    weight. The stand-in at four times its width, so that the weights
    outweigh what a layer's activations add (at the stand-in's own width
    they add 4 to 6%): a kernel read twice adds 1% or more."""
    family = FAMILIES[name]
    config = dict(
        family.tiny_config,
        hidden_dim=512,
        intermediate_dim=4 * family.tiny_config["intermediate_dim"],
    )
    with data_parallel():
        backbone = getattr(keras_hub.models, family.backbone_class)(**config)
        causal_lm = getattr(keras_hub.models, family.causal_lm_class)(
            backbone=backbone, preprocessor=None
        )
        decoder = CachedDecoder(causal_lm, stop_token_ids=[1])
    assert 0.99 < step_bytes_accessed(decoder, 1, 16) / step_floor_bytes(decoder, 1, 16) < 1.02
