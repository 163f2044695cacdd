"""Memory plan: what one device holds for a config, before anything runs.

From the backbone config (config.json only, no weights) and the mesh:
frozen weights (sharded as the layout map shards them), LoRA weights with
their gradients and AdamW moments, training activations kept for the
backward pass (no rematerialisation) and the logits, and the KV cache of
generation. Says whether training and generation fit the device and, when
not, what to change.

Example:
```python
plan = plan_memory(cfg, read_backbone_config(cfg.model.preset))
print(plan.report())
```
"""

import dataclasses

import numpy as np

from pipeline.distribution import gemma_layout_axes, gemma_weight_dims, lora_layout_axes, weight_axes

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


def frozen_weight_bytes(config, layout, axis_size, dtype_bytes):
    total = 0.0
    for path, dims in gemma_weight_dims(config).items():
        per_device = _shard([size for _, size in dims], weight_axes(path, layout), axis_size)
        total += per_device * (1 if path.startswith("token_embedding") else config["num_layers"])
    norms = config["hidden_dim"] * (2 * config["num_layers"] + 1)
    return (total + norms) * dtype_bytes


def lora_parameter_count(config, lora_cfg, layout=None, axis_size=None):
    """Keras LoRA on a kernel of shape (..., out): A is (..., rank), B is (rank, out).
    With a layout (and the mesh's axis sizes): the count on one device, the
    factors sharded as `lora_layout_axes` shards them."""
    lora_layout = lora_layout_axes(layout or {})
    count = 0
    for path, dims in gemma_weight_dims(config).items():
        layer = path.rsplit("/", 1)[0]
        if layer.split("/")[-1] not in lora_cfg.target_layers:
            continue
        shape = [size for _, size in dims]
        for factor, factor_shape in (("a", shape[:-1] + [lora_cfg.rank]), ("b", [lora_cfg.rank, shape[-1]])):
            axes = weight_axes(f"{layer}/lora_kernel_{factor}", lora_layout)
            count += _shard(factor_shape, axes, axis_size or {})
    return count * config["num_layers"]


def activation_bytes_per_row(config, sequence_length, model_axis, dtype_bytes):
    """Tensors one training row keeps for the backward pass, per device."""
    h, heads, kv, dh = (config[k] for k in ("hidden_dim", "num_query_heads", "num_key_value_heads", "head_dim"))
    ffw = config["intermediate_dim"] // 2
    per_token = (
        6 * h  # norms' inputs and outputs, residuals
        + (2 * heads + 2 * kv) * dh / model_axis  # q, k, v, attention output
        + 4 * ffw / model_axis  # gate, up, activation, product
    ) * dtype_bytes + 2 * heads / model_axis * sequence_length * 4  # float32 scores, probabilities
    logits = 2 * config["vocabulary_size"] / model_axis * 4  # float32 logits and their gradient
    return sequence_length * (config["num_layers"] * per_token + logits)


def kv_cache_bytes(config, batch, length, model_axis, dtype_bytes):
    kv = config["num_key_value_heads"]
    kv_per_device = kv / model_axis if kv % model_axis == 0 else kv
    return 2 * config["num_layers"] * batch * length * kv_per_device * config["head_dim"] * dtype_bytes


@dataclasses.dataclass
class MemoryPlan:
    device_gib: float
    frozen: float
    lora_state: float
    activations: float
    kv_cache: float
    train_batch_per_device: int
    activation_per_row: float
    suggestions: list

    @property
    def training(self):
        return self.frozen + self.lora_state + self.activations

    @property
    def generation(self):
        return self.frozen + self.kv_cache

    def fits(self, total):
        return total <= self.device_gib * GIB * HEADROOM

    def report(self):
        rows = [
            ("frozen weights", self.frozen),
            ("LoRA weights, gradients, AdamW moments", self.lora_state),
            (f"training activations ({self.train_batch_per_device} rows/device)", self.activations),
            ("= training", self.training),
            ("KV cache (predict)", self.kv_cache),
            ("= generation (frozen weights + KV cache)", self.generation),
        ]
        lines = [f"per-device memory plan (device: {self.device_gib:g} GiB, plan within {HEADROOM:.0%})"]
        lines += [f"  {name:<45} {size / GIB:9.3f} GiB" for name, size in rows]
        for name, total in (("training", self.training), ("generation", self.generation)):
            lines.append(f"  {name}: {'fits' if self.fits(total) else 'does NOT fit'}")
        lines += [f"  suggestion: {s}" for s in self.suggestions]
        return "\n".join(lines)


def plan_memory(cfg, config, device_gib=None):
    device_gib = device_gib or cfg.hardware.device_memory_gib
    mesh_shape, axis_names = cfg.distribution.mesh_shape, cfg.distribution.axis_names
    axis_size = dict(zip(axis_names, mesh_shape))
    model_axis = mesh_shape[1]
    layout = gemma_layout_axes(*axis_names) if model_axis > 1 else {}  # DataParallel replicates
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    frozen = frozen_weight_bytes(config, layout, axis_size, dtype_bytes)
    # LoRA factors are sharded like their kernels; weights, gradients and two AdamW moments.
    lora_state = 4 * lora_parameter_count(config, cfg.lora, layout, axis_size) * LORA_DTYPE_BYTES
    rows = max(1, cfg.train.batch_size // mesh_shape[0])
    per_row = activation_bytes_per_row(config, cfg.train.sequence_length, model_axis, dtype_bytes)
    predict_rows = max(1, cfg.predict.batch_size // mesh_shape[0])
    kv = kv_cache_bytes(
        config, predict_rows, cfg.train.sequence_length + cfg.predict.max_new_tokens, model_axis, dtype_bytes
    )
    plan = MemoryPlan(device_gib, frozen, lora_state, rows * per_row, kv, rows, per_row, [])
    budget = device_gib * GIB * HEADROOM
    if frozen + lora_state > budget:
        smaller_dtype = " or use model.dtype=bfloat16" if dtype_bytes > 2 else ""
        plan.suggestions.append(
            "the weights alone do not fit: shard over more devices (a larger model axis in "
            f"distribution.mesh_shape){smaller_dtype}"
        )
    else:
        if not plan.fits(plan.training):
            max_rows = int((budget - frozen - lora_state) // per_row)
            if max_rows >= 1:
                plan.suggestions.append(f"train.batch_size={max_rows * mesh_shape[0]} (or lower train.sequence_length)")
            else:
                plan.suggestions.append("lower train.sequence_length: one row's activations do not fit")
        if not plan.fits(plan.generation):
            per_gen_row = kv / predict_rows
            max_rows = int((budget - frozen) // per_gen_row)
            plan.suggestions.append(f"predict.batch_size={max(1, max_rows) * mesh_shape[0]}")
    return plan
