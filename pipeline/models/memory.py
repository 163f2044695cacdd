"""Memory plan: what one device holds for a config, before anything runs.

From the model spec (family and config.json, no weights) and the mesh:
frozen weights (sharded as the layout map shards them), LoRA weights with
their gradients and AdamW moments, the adapted kernels with LoRA merged
(Keras merges them as a step runs), training activations kept for the
backward pass (no rematerialisation) and the logits; for generation the
adapter's weights, the copies of the kernels the decoder makes for a call
(`decoding.merged_kernels`: q/k/v laid out hidden-first, every adapted
kernel with its LoRA merged) and the KV cache. On a GPU the budget is the
share of its memory JAX takes (`hardware.memory_fraction`, set in the
environment as XLA_PYTHON_CLIENT_MEM_FRACTION). Says whether training and
generation fit the device and, when not, what to change.

Example:
```python
plan = plan_memory(cfg, read_model_spec(cfg.model.preset))
print(plan.report())
```
"""

import dataclasses

import numpy as np

from pipeline.models.model import PER_HEAD_INPUT
from pipeline.parallel.distribution import lora_layout_axes, weight_axes

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.9  # XLA needs some room of its own
# Keras creates the LoRA factors in float32 even on a bfloat16 model, and
# AdamW keeps float32 moments (pinned by tests/test_memory.py).
LORA_DTYPE_BYTES = 4


def _shard(size_by_dim, axes, axis_size):
    divisor = 1
    for axis in axes:
        if axis is not None:
            divisor *= axis_size[axis]
    return int(np.prod(size_by_dim)) / divisor


def frozen_weight_bytes(spec, layout, axis_size, dtype_bytes):
    dims = spec.dims
    total = sum(
        _shard([size for _, size in sizes], weight_axes(path, layout), axis_size)
        for path, sizes in spec.weight_dims().items()
    )
    norms = dims.hidden_dim * (2 * dims.num_layers + 1)
    return (total + norms) * dtype_bytes


def lora_parameter_count(spec, lora_cfg, layout=None, axis_size=None):
    """Keras LoRA on a kernel of shape (..., out): A is (..., rank), B is (rank, out).
    With a layout (and the mesh's axis sizes): the count on one device, the
    factors sharded as `lora_layout_axes` shards them."""
    lora_layout = lora_layout_axes(layout or {})
    targets = spec.lora_targets(lora_cfg.target_layers)
    count = 0
    for path, dims in spec.weight_dims().items():
        layer = path.rsplit("/", 1)[0]
        if layer.split("/")[-1] not in targets:
            continue
        shape = [size for _, size in dims]
        for factor, factor_shape in (
            ("a", shape[:-1] + [lora_cfg.rank]),
            ("b", [lora_cfg.rank, shape[-1]]),
        ):
            axes = weight_axes(f"{layer}/lora_kernel_{factor}", lora_layout)
            count += _shard(factor_shape, axes, axis_size or {})
    return count


def decoder_kernel_copy_bytes(spec, layout, axis_size, dtype_bytes, lora_targets):
    """Kernels `CachedDecoder` holds a second copy of for a whole call, on one
    device: the query, key and value kernels stored heads first (Gemma's;
    it lays them out hidden first) and every kernel an adapter is merged
    into."""
    return _kernel_bytes(
        spec,
        layout,
        axis_size,
        dtype_bytes,
        lambda name, dims: (
            (name in PER_HEAD_INPUT and dims[0][0] != "hidden_dim") or name in lora_targets
        ),
    )


def merged_kernel_bytes(spec, layout, axis_size, dtype_bytes, lora_targets):
    """The kernels a training step holds with their adapters merged, on one
    device: Keras computes kernel + A @ B for each adapted layer as it
    runs, and keeps it for the backward pass (pass an `axis_size` whose data
    axis is 1: a kernel sharded over it is gathered to run)."""
    return _kernel_bytes(
        spec, layout, axis_size, dtype_bytes, lambda name, dims: name in lora_targets
    )


def _kernel_bytes(spec, layout, axis_size, dtype_bytes, chosen):
    """Bytes on one device of the kernels for which `chosen(layer name,
    dims)` holds."""
    total = 0.0
    for path, dims in spec.weight_dims().items():
        if chosen(path.split("/")[-2], dims):
            total += _shard([size for _, size in dims], weight_axes(path, layout), axis_size)
    return total * dtype_bytes


def activation_bytes_per_row(spec, sequence_length, model_axis, dtype_bytes, logits_rows=1):
    """Tensors one training row keeps for the backward pass, per device;
    the logits of `logits_rows` rows for each (`logits_rows_per_row`)."""
    d = spec.dims
    h, heads, kv, dh, ffw = (
        d.hidden_dim,
        d.num_query_heads,
        d.num_key_value_heads,
        d.head_dim,
        d.ffw_dim,
    )
    per_token = (
        6 * h  # norms' inputs and outputs, residuals
        + (2 * heads + 2 * kv) * dh / model_axis  # q, k, v, attention output
        + 4 * ffw / model_axis  # gate, up, activation, product
    ) * dtype_bytes + 2 * heads / model_axis * sequence_length * 4  # float32 scores, probabilities
    logits = 2 * d.vocabulary_size / model_axis * 4 * logits_rows  # float32, and their gradient
    return sequence_length * (d.num_layers * per_token + logits)


def logits_rows_per_row(spec, layout, axis_size, data_axis):
    """How many rows' logits a device computes for each of its own: the
    data axis's size where the output projection's hidden axis is sharded
    over it (Gemma's layout on a mesh of both axes), for XLA then gathers
    the rows of the data axis rather than the table, and every device
    computes their logits over its share of the hidden axis (f32[4, 512,
    131072] three times over for Gemma 4 E4B on a TPU v3-8's (4, 2) mesh:
    `make plan-check`); 1 elsewhere."""
    output = next(
        path
        for path in ("token_embedding/reverse_embeddings", "token_embedding/embeddings")
        if path in spec.weight_dims()
    )
    axes = weight_axes(output, layout) or (None, None)
    hidden_axis = axes[0] if output.endswith("reverse_embeddings") else axes[-1]
    return axis_size[data_axis] if hidden_axis == data_axis else 1


def prompt_pass_bytes(spec, rows, prompt_length, model_axis, dtype_bytes):
    """What the decoder's pass over the prompts holds at its widest, one
    layer at a time (nothing is kept for a backward pass): the layer's
    inputs and projections and its float32 attention scores (`CachedDecoder`
    makes no logits for the prompt). With the KV cache and the kernel
    copies, XLA's memory analysis of the tiny model's decoding program comes
    to 0.59 to 0.68 of the plan (tests/test_memory.py), a 7B model's to within
    4% (`make plan-check`, float32)."""
    d = spec.dims
    h, heads, kv, dh, ffw = (
        d.hidden_dim,
        d.num_query_heads,
        d.num_key_value_heads,
        d.head_dim,
        d.ffw_dim,
    )
    per_token = (
        4 * h + (2 * heads + 2 * kv) * dh / model_axis + 3 * ffw / model_axis
    ) * dtype_bytes + heads / model_axis * prompt_length * 4
    return rows * prompt_length * per_token


def kv_cache_bytes(spec, batch, length, model_axis, dtype_bytes):
    """The key/value caches of `CachedDecoder` on one device: one per block
    that has keys and values of its own (`ModelSpec.cache_shapes`), its
    heads sharded over the model axis where they divide by it."""
    return (
        sum(
            2 * batch * length * (kv / model_axis if kv % model_axis == 0 else kv) * head_dim
            for kv, head_dim in filter(None, spec.cache_shapes())
        )
        * dtype_bytes
    )


@dataclasses.dataclass
class MemoryPlan:
    device_gib: float
    memory_fraction: float  # the share of a GPU's memory JAX takes (1 elsewhere)
    frozen: float
    lora_state: float
    merged_kernels: float  # adapted kernels with LoRA merged, kept for the backward pass
    activations: float
    adapter: float  # LoRA weights at generation (0 for the base model)
    kernel_copies: float
    kv_cache: float
    prompt_pass: float
    train_batch_per_device: int
    activation_per_row: float
    suggestions: list

    @property
    def training(self):
        return self.frozen + self.lora_state + self.merged_kernels + self.activations

    @property
    def generation(self):
        return self.frozen + self.adapter + self.kernel_copies + self.kv_cache + self.prompt_pass

    @property
    def budget(self):
        return self.device_gib * GIB * self.memory_fraction * HEADROOM

    def fits(self, total):
        return total <= self.budget

    def report(self):
        rows = [
            ("frozen weights", self.frozen),
            ("LoRA weights, gradients, AdamW moments", self.lora_state),
            ("kernels with LoRA merged (training)", self.merged_kernels),
            (f"training activations ({self.train_batch_per_device} rows/device)", self.activations),
            ("= training", self.training),
            ("adapter weights (predict)", self.adapter),
            ("decoder's kernel copies (q/k/v layout, LoRA merged)", self.kernel_copies),
            ("KV cache (predict)", self.kv_cache),
            ("prompt pass (predict)", self.prompt_pass),
            ("= generation", self.generation),
        ]
        share = f", JAX takes {self.memory_fraction:.0%} of it" if self.memory_fraction < 1 else ""
        lines = [
            f"per-device memory plan (device: {self.device_gib:g} GiB{share}; plan within "
            f"{HEADROOM:.0%}: "
            f"{self.budget / GIB:.2f} GiB)"
        ]
        lines += [f"  {name:<52} {size / GIB:9.3f} GiB" for name, size in rows]
        for name, total in (("training", self.training), ("generation", self.generation)):
            lines.append(f"  {name}: {'fits' if self.fits(total) else 'does NOT fit'}")
        lines += [f"  suggestion: {s}" for s in self.suggestions]
        return "\n".join(lines)


def plan_memory(cfg, spec, device_gib=None):
    device_gib = device_gib or cfg.hardware.device_memory_gib
    mesh_shape, axis_names = cfg.distribution.mesh_shape, cfg.distribution.axis_names
    axis_size = dict(zip(axis_names, mesh_shape, strict=False))
    model_axis = mesh_shape[1]
    layout = (
        spec.family.layout_axes(*axis_names) if model_axis > 1 else {}
    )  # DataParallel replicates
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    frozen = frozen_weight_bytes(spec, layout, axis_size, dtype_bytes)
    # LoRA factors are sharded like their kernels; weights, gradients and two AdamW moments.
    lora_weights = lora_parameter_count(spec, cfg.lora, layout, axis_size) * LORA_DTYPE_BYTES
    lora_state = 4 * lora_weights
    # Kernels are sharded over the data axis too, and gathered over it to run.
    gathered = dict(axis_size, **{axis_names[0]: 1})
    merged = merged_kernel_bytes(
        spec, layout, gathered, dtype_bytes, spec.lora_targets(cfg.lora.target_layers)
    )
    rows = max(1, cfg.train.batch_size // mesh_shape[0])
    per_row = activation_bytes_per_row(
        spec,
        cfg.train.sequence_length,
        model_axis,
        dtype_bytes,
        logits_rows_per_row(spec, layout, axis_size, axis_names[0]),
    )
    adapted = cfg.predict.adapter != "none"
    copies = decoder_kernel_copy_bytes(
        spec,
        layout,
        axis_size,
        dtype_bytes,
        spec.lora_targets(cfg.lora.target_layers) if adapted else [],
    )
    predict_rows = max(1, cfg.predict.batch_size // mesh_shape[0])
    kv = kv_cache_bytes(
        spec,
        predict_rows,
        cfg.train.sequence_length + cfg.predict.max_new_tokens,
        model_axis,
        dtype_bytes,
    )
    prompt_pass = prompt_pass_bytes(
        spec, predict_rows, cfg.train.sequence_length, model_axis, dtype_bytes
    )
    plan = MemoryPlan(
        device_gib,
        cfg.hardware.memory_fraction or 1.0,
        frozen,
        lora_state,
        merged,
        rows * per_row,
        lora_weights if adapted else 0.0,
        copies,
        kv,
        prompt_pass,
        rows,
        per_row,
        [],
    )
    budget = plan.budget
    if frozen + lora_state > budget:
        smaller_dtype = " or use model.dtype=bfloat16" if dtype_bytes > 2 else ""
        plan.suggestions.append(
            "the weights alone do not fit: shard over more devices (a larger model axis in "
            f"distribution.mesh_shape){smaller_dtype}"
        )
    elif frozen + lora_state + merged > budget:
        plan.suggestions.append(
            "the kernels with LoRA merged do not fit beside the weights: adapt fewer layers "
            "(lora.target_layers: [query, value]) or shard over more devices"
        )
    else:
        if not plan.fits(plan.training):
            max_rows = int((budget - frozen - lora_state - merged) // per_row)
            if max_rows >= 1:
                plan.suggestions.append(
                    f"train.batch_size={max_rows * mesh_shape[0]} (or lower train.sequence_length)"
                )
            else:
                plan.suggestions.append(
                    "lower train.sequence_length: one row's activations do not fit"
                )
        if not plan.fits(plan.generation):
            per_gen_row = (kv + prompt_pass) / predict_rows
            max_rows = int((budget - plan.generation + kv + prompt_pass) // per_gen_row)
            if max_rows >= 1:
                plan.suggestions.append(f"predict.batch_size={max_rows * mesh_shape[0]}")
            else:
                plan.suggestions.append(
                    "the decoder's kernel copies do not fit: adapt fewer kernels "
                    "(lora.target_layers: "
                    "query, key, value, attention_output) or shard over more devices"
                )
    return plan
