"""What one step of `CachedDecoder` moves through memory: XLA's count of the
compiled step, and the floor any decoder (of any family) must read. The
benchmarks divide one by the other (tests/test_decoding.py pins the ratio);
decoding itself never calls these.

Example:
```python
decoder = CachedDecoder(causal_lm, stop_token_ids=[1])
ratio = step_bytes_accessed(decoder, 32, 640) / step_floor_bytes(decoder, 32, 640)
```
"""

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.models.decoding import merged_kernels, model_state, state_scope
from pipeline.models.model import spec_of
from pipeline.parallel.distribution import without_distribution


def step_bytes_accessed(decoder, batch, length):
    """Bytes one decoding step reads and writes (one new token per row,
    attention over `length` cache positions), by XLA's cost analysis of the
    compiled step; compiles, runs nothing. The step gets the kernels merged,
    as the decoding loop does. The embedding lookups (`decoder.embed`) are
    left out of the compiled step and their rows counted instead: XLA
    counts a gather as reading its whole table, or one row, depending on
    the shapes."""
    lm, backbone = decoder.causal_lm, decoder.backbone
    abstract = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype)  # noqa: E731
    state = model_state(lm, read=abstract)
    merged = merged_kernels(backbone)
    equations = {layer: equation for layer, (equation, _) in merged.items()}
    kernels = [abstract(kernel) for _, kernel in merged.values()]

    def step(state, kernels, embedded, caches, start):
        layer_kernels = {
            layer: (equations[layer], kernel) for layer, kernel in zip(merged, kernels, strict=True)
        }
        with state_scope(lm, state):
            logits, caches = decoder.forward(layer_kernels, embedded, caches, start, length)
        return jnp.argmax(logits[:, -1, :], axis=-1), caches

    caches = jax.eval_shape(lambda: decoder.empty_caches(batch, length))
    embedded = jax.eval_shape(decoder.embed, jax.ShapeDtypeStruct((batch, 1), jnp.int32))
    start = jax.ShapeDtypeStruct((), jnp.int32)
    with without_distribution():  # one device's whole step
        compiled = (
            jax.jit(step, donate_argnums=3).lower(state, kernels, embedded, caches, start).compile()
        )
    # A lookup reads one row of its table per token (the compiled step counts
    # reading those rows back, as its input).
    return compiled.cost_analysis()["bytes accessed"] + sum(
        rows.size * np.dtype(rows.dtype).itemsize for rows in jax.tree.leaves(embedded)
    )


def step_floor_bytes(decoder, batch, length):
    """What any decoding step must read at least: every weight once (the
    embedding table that makes the logits, the norms, the kernels with LoRA
    merged, so each a kernel's size in the compute dtype) and the key/value
    cache of `length` positions of every row that each layer attends to
    (Gemma 4's last layers attend to an earlier layer's: read again, as
    they come one after the other). Any family's decoder. An input table
    apart from the logits' (an untied model's, Gemma 4's per-layer one) is
    only looked up: its rows are counted with the step, as there."""
    causal_lm = decoder.causal_lm
    backbone = causal_lm.backbone
    itemsize = np.dtype(causal_lm.compute_dtype).itemsize
    kernels = (
        sum(np.prod(w.shape) for w in backbone.weights if w.path.endswith("/kernel")) * itemsize
    )
    others = sum(
        np.prod(w.shape) * np.dtype(w.dtype).itemsize
        for w in backbone.weights
        if w.path.endswith(("embeddings", "scale")) and w.path not in looked_up_only(decoder)
    )
    shapes = spec_of(causal_lm).cache_shapes()
    cache = sum(
        2 * batch * length * heads * head_dim * itemsize
        for heads, head_dim in (
            shapes[i if block.kv_source is None else block.kv_source]
            for i, block in enumerate(decoder.model.blocks)
        )
    )
    return kernels + others + cache


def looked_up_only(decoder):
    """Paths of the embedding tables a step only looks rows up in: the input
    table of a model whose logits have their own (`reverse_embeddings`),
    and Gemma 4's per-layer table."""
    embedding = decoder.backbone.token_embedding
    tables = set() if embedding.tie_weights else {embedding.embeddings.path}
    per_layer = decoder.model.per_layer_inputs
    return tables | ({per_layer.table.embeddings.path} if per_layer is not None else set())
