"""Greedy cached decoding for KerasHub's Gemma, Gemma 3, Gemma 4 (dense),
Mistral, Llama and Qwen 3 causal LMs, built for speed.

KerasHub's `generate` keeps the key/value cache of every layer in one
tensor (Gemma 3: one pair per layer) that each decoding step slices apart
and stacks together again, and every step attends over the whole padded
length: at 7B-class width a step moves 2 to 3 times what it must read. This
decoder runs the same layers with the same weights (LoRA included, read
through `keras_internals.decoder_model`) but:

- keeps one key and one value cache per layer that has keys and values of
  its own (Gemma 4's last layers read an earlier layer's), each of its own
  size, which XLA updates in place, laid out as the attention products read
  them (no copy per step);
- merges each LoRA adapter into its kernel once per call, not at every
  step (Keras' `EinsumDense` adds A @ B to the kernel each time it runs);
- decodes in up to `max_spans` spans of positions, each attending only to
  the part of the cache that can hold tokens so far, not to the whole padded
  length (each span is one more loop body for XLA to compile, hence few);
- ends a row at a stop token or `max_new_tokens` after its own prompt, and
  the batch once every row has ended.

Its tokens are KerasHub's greedy `generate` tokens in every test of
tests/test_decoding.py (float32 and bfloat16, grouped-query, Gemma 2 blocks)
and, for every family it runs, of tests/test_families.py (float32,
grouped-query, sliding windows, query/key norms). Its attention differs
from KerasHub's only in rounding: it scales the queries before the product
with the keys and divides by the softmax's sum after the product with the
values, as flash attention does, so in bfloat16 a family's logits agree
with KerasHub's to rounding and a near-tie may pick the other token. Greedy only:
every stage of the pipeline decodes greedily.

Example:
```python
decode = CachedDecoder(causal_lm, stop_token_ids=[1, 107])
token_ids = decode(token_ids, padding_mask, max_new_tokens=64)  # numpy in, numpy out
```
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np

from pipeline import keras_internals
from pipeline.models.model import PER_HEAD_INPUT, projections, spec_of
from pipeline.parallel import hosts
from pipeline.parallel.distribution import data_sharding, shard_heads_by_rows


class CachedDecoder:
    """Greedy decoding with a per-layer KV cache, compiled once per shape.

    Args:
        causal_lm: a KerasHub causal LM of any family in `families` (LoRA
            enabled or not); its current weights are read at every call.
        stop_token_ids: ids that end a row (`<eos>`, `<end_of_turn>`).
        max_spans: how many spans the positions after the prompts are
            decoded in (each attends only to the cache filled so far, and
            is one more loop body to compile).

    Example:
    ```python
    decode = CachedDecoder(causal_lm, stop_token_ids=[1, 107])
    out = decode(token_ids, padding_mask, max_new_tokens=64)
    ```
    """

    def __init__(self, causal_lm, stop_token_ids, max_spans=4):
        self.causal_lm = causal_lm
        self.backbone = causal_lm.backbone
        self.stop_token_ids = jnp.asarray(stop_token_ids, "int32")
        self.max_spans = max_spans
        self.model = keras_internals.decoder_model(self.backbone)
        self.final_logit_cap = causal_lm.get_config().get("final_logit_cap")  # Gemma 4's task
        # max_new_tokens is fixed per stage, so making it static adds no programs.
        self._compiled = jax.jit(self._stateless_decode, static_argnames="max_new_tokens")

    def __call__(self, token_ids, padding_mask, max_new_tokens):
        """Prompts right-padded in (batch, length) `token_ids`; returns the
        same shape with each row's generated tokens after its prompt. On a
        pod every process passes the whole batch and gets the whole result."""
        out = self._compiled(
            *self._arguments(token_ids, padding_mask), max_new_tokens=int(max_new_tokens)
        )
        return hosts.to_numpy(out)

    def lower(self, token_ids, padding_mask, max_new_tokens, state=None):
        """The decoding program of a call with these arguments, lowered and
        not run (`.compile().as_text()` shows what a mesh makes it move).
        With `state` (as `model_state` gives it), the arguments may all be
        `jax.ShapeDtypeStruct`s: nothing is read (`compiled_memory`)."""
        if state is None:
            state, token_ids, padding_mask = self._arguments(token_ids, padding_mask)
        return self._compiled.lower(
            state, token_ids, padding_mask, max_new_tokens=int(max_new_tokens)
        )

    def _arguments(self, token_ids, padding_mask):
        return (model_state(self.causal_lm), *global_prompts(token_ids, padding_mask))

    def _stateless_decode(self, state, token_ids, padding_mask, max_new_tokens):
        with state_scope(self.causal_lm, state):
            return self._decode(token_ids, padding_mask, max_new_tokens)

    def _decode(self, token_ids, padding_mask, max_new_tokens):
        batch, length = token_ids.shape
        row_lengths = padding_mask.sum(axis=-1).astype("int32")
        caches = self.empty_caches(batch, length)
        kernels = merged_kernels(self.backbone)  # once per call, read by every step
        # One pass over the prompt region seeds the cache. Decoding restarts
        # at the shortest prompt (or at the end of that region, if every
        # prompt is longer), so a position past a row's prompt is overwritten
        # before it is read, and the rest of a longer prompt is fed on.
        prefill = max(length - max_new_tokens, 1)
        _, caches = self.forward(kernels, self.embed(token_ids[:, :prefill]), caches, 0, prefill)
        index = jnp.minimum(
            jnp.min(row_lengths), prefill
        )  # the first cache position not yet written
        last = jnp.minimum(jnp.max(row_lengths) + max_new_tokens, length)
        done = jnp.zeros((batch,), bool)
        carry = (token_ids, caches, index, done)
        # Spans split the region after the prompts: the first also covers
        # the teacher-forced ends of prompts longer than the shortest.
        span = max(1, -(-(length - prefill) // self.max_spans))
        for span_end in range(prefill + span, length + span, span):
            carry = self._decode_span(
                kernels,
                carry,
                padding_mask,
                row_lengths + max_new_tokens,
                last,
                min(span_end, length),
            )
        return carry[0]

    def _decode_span(self, kernels, carry, padding_mask, row_ends, last, span_end):
        """Generates positions up to `span_end` (static), reading the cache
        only up to there."""

        def cond(carry):
            _, _, index, done = carry
            return (index < jnp.minimum(last, span_end)) & ~jnp.all(done)

        def body(carry):
            token_ids, caches, index, done = carry
            previous = jax.lax.dynamic_slice_in_dim(token_ids, index - 1, 1, axis=1)
            logits, caches = self.forward(
                kernels, self.embed(previous), caches, index - 1, span_end
            )
            generated = jnp.argmax(logits[:, -1, :], axis=-1).astype(token_ids.dtype)
            in_prompt = padding_mask[:, index]
            current = jnp.where(in_prompt, token_ids[:, index], generated)
            token_ids = jax.lax.dynamic_update_slice(token_ids, current[:, None], (0, index))
            stopped = jnp.isin(current, self.stop_token_ids) & ~in_prompt
            done = done | stopped | (index + 1 >= row_ends)
            return token_ids, caches, index + 1, done

        return jax.lax.while_loop(cond, body, carry)

    def empty_caches(self, batch, length):
        """The (key, value) cache of every layer, zeros, for `batch` rows of
        `length` positions (None for a layer that reads another's)."""
        dtype = self.causal_lm.compute_dtype

        def zeros(kv_heads, head_dim):
            return shard_heads_by_rows(
                jnp.zeros((kv_heads * batch, length, head_dim), dtype), kv_heads
            )

        return [
            None if shape is None else (zeros(*shape), zeros(*shape))
            for shape in spec_of(self.causal_lm).cache_shapes()
        ]

    def embed(self, token_ids):
        """What `forward` takes of `token_ids`: their rows of the embedding
        table and, for a model with per-layer inputs, of their table (else
        None)."""
        per_layer = self.model.per_layer_inputs
        return (
            self.backbone.token_embedding(token_ids),
            None if per_layer is None else per_layer.table(token_ids),
        )

    def forward(self, kernels, embedded, caches, start, span_end):
        """Logits for the tokens `embedded` (as `embed` gives them), placed
        at `start`; keys and values go into the caches, attention reads
        cache positions [0, span_end). `kernels` is `merged_kernels(backbone)`;
        run it in `state_scope`."""
        tokens, per_layer_rows = embedded
        x = tokens * keras.ops.cast(self.model.embedding_scale, tokens.dtype)
        per_layer_inputs = self._per_layer_inputs(x, per_layer_rows)
        positions = start + jnp.arange(tokens.shape[1])
        mask = jnp.arange(span_end)[None, :] <= positions[:, None]
        mask = jnp.broadcast_to(mask[None], (tokens.shape[0], *mask.shape))
        caches = list(caches)
        for i, block in enumerate(self.model.blocks):
            shared = block.kv_source is not None
            x, cache = _decoder_block(
                block,
                kernels,
                x,
                caches[block.kv_source if shared else i],
                (start, span_end, mask),
                per_layer_inputs[i],
            )
            if not shared:
                caches[i] = cache
        logits = self.backbone.token_embedding(self.model.final_norm(x), reverse=True)
        if self.final_logit_cap is not None:
            logits = jnp.tanh(logits / self.final_logit_cap) * self.final_logit_cap
        return logits, caches

    def _per_layer_inputs(self, x, rows):
        """Each block's per-layer input (Gemma 4 E2B, E4B: its slice of the
        table rows plus its normalized slice of a projection of the scaled
        embeddings `x`, as KerasHub sums them), or None for every block."""
        per_layer = self.model.per_layer_inputs
        if per_layer is None:
            return [None] * len(self.model.blocks)
        dtype, width = x.dtype, per_layer.width
        rows = rows.astype(dtype) * keras.ops.cast(float(width) ** 0.5, dtype)
        projected = per_layer.projection(x) * keras.ops.cast(
            float(self.backbone.hidden_dim) ** -0.5, dtype
        )
        return [
            (
                per_layer.norm(projected[..., i * width : (i + 1) * width])
                + rows[..., i * width : (i + 1) * width]
            )
            * keras.ops.cast(2.0**-0.5, dtype)
            for i in range(len(self.model.blocks))
        ]


def _cache_layout(x, dtype):
    """(batch, positions, kv heads, head_dim) keys or values as the cache
    holds them: (kv heads × batch, positions, head_dim). Heads first: the
    model axis shards the heads, so the merged axis is sharded as a block
    of heads (batch first, it would be resharded at every step)."""
    batch, length, kv_heads, head_dim = x.shape
    merged = jnp.reshape(jnp.transpose(x, (2, 0, 1, 3)), (kv_heads * batch, length, head_dim))
    return shard_heads_by_rows(merged.astype(dtype), kv_heads)


def global_prompts(token_ids, padding_mask):
    """Prompts as a decoding program takes them: under a distribution, rows
    over the data axis, each host feeding its own (numpy in)."""
    token_ids, padding_mask = np.asarray(token_ids, "int32"), np.asarray(padding_mask, bool)
    if keras.distribution.distribution() is None:
        return token_ids, padding_mask
    sharding = data_sharding(token_ids.shape)
    return hosts.global_batch(token_ids, sharding), hosts.global_batch(padding_mask, sharding)


def model_state(causal_lm, read=lambda variable: variable.value):
    """(trainable, non-trainable) values of the model's variables, as the
    compiled programs take them (`read` maps each variable)."""
    return (
        [read(v) for v in causal_lm.trainable_variables],
        [read(v) for v in causal_lm.non_trainable_variables],
    )


def state_scope(causal_lm, state):
    """A `keras.StatelessScope` in which the model's variables hold `state`
    (as `model_state` gives it), so a traced program reads its arguments."""
    trainable, non_trainable = state
    mapping = [
        *zip(causal_lm.trainable_variables, trainable, strict=True),
        *zip(causal_lm.non_trainable_variables, non_trainable, strict=True),
    ]
    return keras.StatelessScope(state_mapping=mapping)


def _attention(block, query, key, value, mask, start):
    """`GemmaAttention`'s attention (same scaling, soft cap, sliding window
    and float32 softmax) on keys and values in the cache's layout, with two
    changes that make XLA move fewer bytes:

    - the softmax's division comes after the product with the values, so
      the probabilities are never written out (flash attention's order);
    - no axis of one entry: rows of (key/value head, batch) form one axis,
      and the query positions of the heads sharing a key/value head another,
      dropped at a decoding step of a model with as many key/value heads as
      heads. Kept, such an axis makes XLA copy the scores, or the whole
      cache (Gemma 2B has one key/value head), at every step.
    """
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[0] // batch
    groups = heads // kv_heads
    query = query * keras.ops.cast(block.query_scale, query.dtype)
    query = jnp.reshape(query, (batch, length, kv_heads, groups, head_dim))
    rows = shard_heads_by_rows(
        jnp.reshape(
            jnp.transpose(query, (2, 0, 3, 1, 4)), (kv_heads * batch, groups * length, head_dim)
        ),
        kv_heads,
    )
    if block.sliding_window:
        back = (start + jnp.arange(length))[:, None] - jnp.arange(mask.shape[-1])[None, :]
        mask = mask & (back < block.sliding_window)[None]
    span = mask.shape[-1]
    mask = jnp.reshape(
        jnp.broadcast_to(mask[None, :, None], (kv_heads, batch, groups, length, span)),
        (kv_heads * batch, groups * length, span),
    )
    if groups * length == 1:
        rows, mask = rows[:, 0], mask[:, 0]
    logits = jnp.einsum("n...h,nsh->n...s", rows, key)
    cap = block.logit_soft_cap
    if cap is not None:
        logits = jnp.tanh(logits / cap) * cap
    # Keras' masked softmax, in float32: masked positions get -1e9, whose
    # exp is 0 (every row sees at least its own position).
    logits = jnp.where(mask, logits.astype("float32"), -1e9)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    attended = jnp.einsum(
        "n...s,nsh->n...h", weights.astype(value.dtype), value, preferred_element_type="float32"
    )
    attended = (attended / jnp.sum(weights, axis=-1)[..., None]).astype(query.dtype)
    attended = jnp.reshape(attended, (kv_heads, batch, groups, length, head_dim))
    return jnp.reshape(jnp.transpose(attended, (1, 3, 0, 2, 4)), (batch, length, heads * head_dim))


def merged_kernels(backbone):
    """{layer: (einsum equation, kernel)} of every projection of every
    decoder block, LoRA merged as Keras merges it (kernel + alpha / rank *
    A @ B, in the compute dtype). The query, key and value kernels (heads,
    hidden, head_dim) are laid out hidden first and the attention output's
    (heads, head_dim, hidden) as one (heads × head_dim, hidden) matrix, as
    the products want them: in their own layouts XLA would transpose them
    at every step."""
    kernels = {}
    for _, name, layer in projections(backbone):
        kernel = layer.kernel  # merged here, once
        if name in PER_HEAD_INPUT:
            hidden_first = not heads_first(layer.equation)
            kernels[layer] = (
                "btd,dnh->btnh",
                kernel if hidden_first else jnp.transpose(kernel, (1, 0, 2)),
            )
        elif name == "attention_output":
            kernels[layer] = ("btf,fd->btd", jnp.reshape(kernel, (-1, kernel.shape[-1])))
        else:
            kernels[layer] = ("btd,df->btf", kernel)
    return kernels


def heads_first(equation):
    """Whether a query, key or value projection's kernel has its heads axis
    before its hidden one (Gemma's "btd,ndh->btnh"; Llama's "bqm,muh->bquh"
    has hidden first)."""
    inputs, kernel = equation.split("->")[0].split(",")
    return kernel[0] != inputs[-1]


def _project(layer, kernels, x):
    """`EinsumDense.call` or `Dense.call` with a kernel merged beforehand
    (none of these families' projections has a bias or an activation)."""
    equation, kernel = kernels[layer]
    return jnp.einsum(equation, x, kernel)


def _decoder_block(block, kernels, x, cache, place, per_layer_input):
    """A decoder block's call with a cache (`block`: a
    `keras_internals.DecoderBlock`; `cache`: its (key, value) cache, or
    the one of the block it reads; `place`: (start, span_end, mask) of
    `forward`). Returns the block's output and the cache."""
    start, span_end, mask = place
    normalized = block.pre_attention_norm(x)
    query = _project(block.query, kernels, normalized)
    if block.query_norm is not None:
        query = block.query_norm(query)
    query = block.rope(query, start)
    if block.kv_source is None:
        cache = _write_keys_and_values(block, kernels, normalized, cache, start)
    key_cache, value_cache = cache
    attended = _attention(
        block, query, key_cache[:, :span_end], value_cache[:, :span_end], mask, start
    )
    attended = _project(block.attention_output, kernels, attended)
    if block.post_attention_norm is not None:
        attended = block.post_attention_norm(attended)
    attention_x = x + attended
    normalized = block.pre_ffw_norm(attention_x)
    gate = block.gate_activation(_project(block.ffw_gating, kernels, normalized))
    hidden = gate * _project(block.ffw_gating_2, kernels, normalized)
    out = _project(block.ffw_linear, kernels, hidden)
    if block.post_ffw_norm is not None:
        out = block.post_ffw_norm(out)
    x = out + attention_x
    if block.per_layer_gate is not None:
        input_gate, up_projection, norm = block.per_layer_gate
        gated = keras.activations.gelu(input_gate(x), approximate=True) * per_layer_input
        x = x + norm(up_projection(gated))
    if block.output_scale is not None:
        x = x * keras.ops.cast(block.output_scale, x.dtype)
    return x, cache


def _write_keys_and_values(block, kernels, normalized, cache, start):
    """The block's keys and values of `normalized`, written into its cache at
    `start`."""
    raw_key = _project(block.key, kernels, normalized)
    key = block.rope(raw_key if block.key_norm is None else block.key_norm(raw_key), start)
    value = raw_key if block.value is None else _project(block.value, kernels, normalized)
    if block.value_norm is not None:
        value = block.value_norm(value)
    # Caches are (kv heads × batch, length, head_dim): the layout both attention
    # products read without transposing (and so copying) the cache.
    return tuple(
        jax.lax.dynamic_update_slice(part, _cache_layout(new, part.dtype), (0, start, 0))
        for part, new in zip(cache, (key, value), strict=True)
    )
