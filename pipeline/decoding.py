"""Greedy cached decoding for a KerasHub `GemmaCausalLM`, built for speed.

`GemmaCausalLM.generate` keeps the key/value cache of every layer in one
(batch, layers, 2, length, heads, head_dim) tensor that each decoding step
slices apart and stacks together again, and every step attends over the
whole padded length. This decoder runs the same layers with the same
weights (LoRA included) but:

- keeps one key and one value cache per layer, which XLA updates in place;
- decodes in up to `max_spans` spans of positions, each attending only to
  the part of the cache that can hold tokens so far, not to the whole padded
  length (each span is one more loop body for XLA to compile, hence few);
- ends a row at a stop token or `max_new_tokens` after its own prompt, and
  the batch once every row has ended.

Its tokens are KerasHub's greedy `generate` tokens (pinned by
tests/test_decoding.py), so the pipeline's outputs do not depend on which one
runs. Greedy only: every stage of the pipeline decodes greedily.

Example:
```python
decode = GemmaDecoder(causal_lm, stop_token_ids=[1, 107])
token_ids = decode(token_ids, padding_mask, max_new_tokens=64)  # numpy in, numpy out
```
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np

from pipeline import hosts, keras_internals
from pipeline.distribution import data_sharding


class GemmaDecoder:
    """Greedy decoding with a per-layer KV cache, compiled once per shape.

    Args:
        causal_lm: a KerasHub `GemmaCausalLM` (LoRA enabled or not); its
            current weights are read at every call.
        stop_token_ids: ids that end a row (`<eos>`, `<end_of_turn>`).
        max_spans: how many spans the positions after the prompts are
            decoded in (each attends only to the cache filled so far, and
            is one more loop body to compile).

    Example:
    ```python
    decode = GemmaDecoder(causal_lm, stop_token_ids=[1, 107])
    out = decode(token_ids, padding_mask, max_new_tokens=64)
    ```
    """

    def __init__(self, causal_lm, stop_token_ids, max_spans=4):
        self.causal_lm = causal_lm
        self.backbone = causal_lm.backbone
        self.stop_token_ids = jnp.asarray(stop_token_ids, "int32")
        self.max_spans = max_spans
        # max_new_tokens is fixed per stage, so making it static adds no programs.
        self._compiled = jax.jit(self._stateless_decode, static_argnames="max_new_tokens")

    def __call__(self, token_ids, padding_mask, max_new_tokens):
        """Prompts right-padded in (batch, length) `token_ids`; returns the
        same shape with each row's generated tokens after its prompt. On a
        pod every process passes the whole batch and gets the whole result."""
        lm = self.causal_lm
        state = ([v.value for v in lm.trainable_variables], [v.value for v in lm.non_trainable_variables])
        token_ids, padding_mask = np.asarray(token_ids, "int32"), np.asarray(padding_mask, bool)
        if keras.distribution.distribution() is not None:
            # Rows over the data axis: each host feeds and decodes its own.
            sharding = data_sharding(token_ids.shape)
            token_ids, padding_mask = hosts.global_batch(token_ids, sharding), hosts.global_batch(padding_mask, sharding)
        out = self._compiled(state, token_ids, padding_mask, max_new_tokens=int(max_new_tokens))
        return hosts.to_numpy(out)

    def _stateless_decode(self, state, token_ids, padding_mask, max_new_tokens):
        trainable, non_trainable = state
        lm = self.causal_lm
        mapping = list(zip(lm.trainable_variables, trainable)) + list(zip(lm.non_trainable_variables, non_trainable))
        with keras.StatelessScope(state_mapping=mapping):
            return self._decode(token_ids, padding_mask, max_new_tokens)

    def _decode(self, token_ids, padding_mask, max_new_tokens):
        batch, length = token_ids.shape
        row_lengths = padding_mask.sum(axis=-1).astype("int32")
        dtype = self.causal_lm.compute_dtype
        shape = (batch, length, self.backbone.num_key_value_heads, self.backbone.head_dim)
        caches = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.backbone.transformer_layers]
        # One pass over the prompt region seeds the cache. Decoding restarts
        # at the shortest prompt (or at the end of that region, if every
        # prompt is longer), so a position past a row's prompt is overwritten
        # before it is read, and the rest of a longer prompt is fed on.
        prefill = max(length - max_new_tokens, 1)
        _, caches = self._forward(token_ids[:, :prefill], caches, 0, prefill)
        index = jnp.minimum(jnp.min(row_lengths), prefill)  # the first cache position not yet written
        last = jnp.minimum(jnp.max(row_lengths) + max_new_tokens, length)
        done = jnp.zeros((batch,), bool)
        carry = (token_ids, caches, index, done)
        # Spans split the region after the prompts: the first also covers
        # the teacher-forced ends of prompts longer than the shortest.
        span = max(1, -(-(length - prefill) // self.max_spans))
        for span_end in range(prefill + span, length + span, span):
            carry = self._decode_span(carry, padding_mask, row_lengths + max_new_tokens, last, min(span_end, length))
        return carry[0]

    def _decode_span(self, carry, padding_mask, row_ends, last, span_end):
        """Generates positions up to `span_end` (static), reading the cache
        only up to there."""

        def cond(carry):
            _, _, index, done = carry
            return (index < jnp.minimum(last, span_end)) & ~jnp.all(done)

        def body(carry):
            token_ids, caches, index, done = carry
            previous = jax.lax.dynamic_slice_in_dim(token_ids, index - 1, 1, axis=1)
            logits, caches = self._forward(previous, caches, index - 1, span_end)
            generated = jnp.argmax(logits[:, -1, :], axis=-1).astype(token_ids.dtype)
            in_prompt = padding_mask[:, index]
            current = jnp.where(in_prompt, token_ids[:, index], generated)
            token_ids = jax.lax.dynamic_update_slice(token_ids, current[:, None], (0, index))
            stopped = jnp.isin(current, self.stop_token_ids) & ~in_prompt
            done = done | stopped | (index + 1 >= row_ends)
            return token_ids, caches, index + 1, done

        return jax.lax.while_loop(cond, body, carry)

    def _forward(self, token_ids, caches, start, span_end):
        """Logits for `token_ids` placed at `start`; keys and values go into
        the caches, attention reads cache positions [0, span_end)."""
        backbone = self.backbone
        x = backbone.token_embedding(token_ids)
        x = x * keras.ops.cast(keras.ops.sqrt(backbone.hidden_dim), x.dtype)
        positions = start + jnp.arange(token_ids.shape[1])
        mask = jnp.arange(span_end)[None, :] <= positions[:, None]
        mask = jnp.broadcast_to(mask[None], (token_ids.shape[0], *mask.shape))
        new_caches = []
        for block, (key_cache, value_cache) in zip(backbone.transformer_layers, caches):
            x, key_cache, value_cache = _decoder_block(block, x, key_cache, value_cache, start, span_end, mask)
            new_caches.append((key_cache, value_cache))
        logits = backbone.token_embedding(backbone.layer_norm(x), reverse=True)
        return logits, new_caches


def _decoder_block(block, x, key_cache, value_cache, start, span_end, mask):
    """`GemmaDecoderBlock.call` with a cache, its key and value apart."""
    attention = block.attention
    normalized = block.pre_attention_norm(x)
    query = keras_internals.apply_rope(attention, attention.query_dense(normalized), start)
    key = keras_internals.apply_rope(attention, attention.key_dense(normalized), start)
    value = attention.value_dense(normalized)
    key_cache = jax.lax.dynamic_update_slice(key_cache, key.astype(key_cache.dtype), (0, start, 0, 0))
    value_cache = jax.lax.dynamic_update_slice(value_cache, value.astype(value_cache.dtype), (0, start, 0, 0))
    attended = keras_internals.compute_attention(
        attention, query, key_cache[:, :span_end], value_cache[:, :span_end], mask, start
    )
    attended = attention.output_dense(attended)
    if block.use_post_attention_norm:
        attended = block.post_attention_norm(attended)
    attention_x = x + attended
    normalized = block.pre_ffw_norm(attention_x)
    hidden = keras.activations.gelu(block.gating_ffw(normalized), approximate=True) * block.gating_ffw_2(normalized)
    out = block.ffw_linear(hidden)
    if block.use_post_ffw_norm:
        out = block.post_ffw_norm(out)
    return out + attention_x, key_cache, value_cache
