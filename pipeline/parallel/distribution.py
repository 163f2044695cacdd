"""The Keras distribution for a run: device mesh, layout map, checks.

A (1, 8) ("batch", "model") mesh on a TPU v3-8 shards every large weight
across the 8 cores (`ModelParallel`); a model axis of 1 is plain data
parallelism (`DataParallel`). The model's family gives the layout map and
the weights it shards as plain data (`pipeline.models.families`), so this
module knows no model. Everything that can go wrong is checked before any
weight is loaded, with a message that says what to change.

Example:
```python
spec = read_model_spec("gemma_instruct_7b_en")
distribution = build_distribution(cfg.distribution, spec.family.layout_axes, spec.weight_dims(),
                                  [cfg.train.batch_size])
keras.distribution.set_distribution(distribution)  # then from_preset(...)
```
"""

import contextlib
import re

from pipeline.errors import InputError


class DistributionError(InputError):
    """The mesh does not fit the devices or the model; the message says why."""


def lora_layout_axes(layout_axes):
    """Layouts of the LoRA factors of every sharded kernel, so that they are
    sharded like the kernel they adapt. Keras' LoRA on a kernel of shape
    (..., out) has `lora_kernel_a` of shape (..., rank) and `lora_kernel_b`
    of shape (rank, out): A keeps the kernel's axes but the last, B keeps
    the kernel's last axis; the rank is never sharded."""
    lora = {}
    for pattern, axes in layout_axes.items():
        if pattern.endswith(".kernel"):
            layer = pattern.removesuffix(".kernel")
            lora[f"{layer}/lora_kernel_a"] = (*axes[:-1], None)
            lora[f"{layer}/lora_kernel_b"] = (None, axes[-1])
    return lora


def weight_axes(path, layout_axes):
    """The mesh axis of each dimension of the weight at `path` (None: not
    sharded), as Keras matches layout-map keys (re.fullmatch)."""
    for pattern, axes in layout_axes.items():
        if re.fullmatch(pattern, path):
            return axes
    return ()


def check_mesh(mesh_shape, axis_names, device_count):
    if len(mesh_shape) != 2 or len(axis_names) != 2:
        raise DistributionError(
            "distribution.mesh_shape and distribution.axis_names need two entries "
            f"(data axis, model axis); got {mesh_shape} and {axis_names}"
        )
    size = mesh_shape[0] * mesh_shape[1]
    if size != device_count:
        raise DistributionError(
            f"distribution.mesh_shape {mesh_shape} needs {size} devices but "
            f"{device_count} are visible; set distribution.mesh_shape=[1,{device_count}] "
            f"(or distribution.host_device_count={size} to simulate them on the CPU)"
        )


def check_batch_sizes(mesh_shape, batch_sizes):
    for batch_size in batch_sizes:
        if batch_size % mesh_shape[0]:
            raise DistributionError(
                f"batch size {batch_size} does not divide by the data axis "
                f"({mesh_shape[0]} in distribution.mesh_shape); use a multiple of it"
            )


def check_shardable(layout_axes, weight_dims, mesh_shape, axis_names):
    """`layout_axes` maps layout-map regexes to axis-name tuples;
    `weight_dims` maps weight paths to [(config field, size), ...]."""
    axis_size = dict(zip(axis_names, mesh_shape, strict=True))
    for path, dims in weight_dims.items():
        for (field, size), axis in zip(dims, weight_axes(path, layout_axes), strict=False):
            if axis is not None and size % axis_size[axis]:
                raise DistributionError(
                    f"{field}={size} of the model does not divide by the "
                    f"'{axis}' mesh axis ({axis_size[axis]}), which shards {path}; "
                    f"choose a distribution.mesh_shape whose '{axis}' size divides "
                    f"{size} (e.g. [{mesh_shape[0] * mesh_shape[1]}, 1] for data "
                    "parallelism)"
                )


def build_distribution(distribution_cfg, layout_axes, weight_dims, batch_sizes):
    """Initialises multi-host JAX if configured, checks, returns the
    Keras distribution (not yet set). `layout_axes(data_axis, model_axis)`
    gives the layout map as plain data; `weight_dims` the sizes it shards."""
    import keras

    from pipeline.parallel import hosts

    hosts.initialize(distribution_cfg)
    mesh_shape = list(distribution_cfg.mesh_shape)
    axis_names = list(distribution_cfg.axis_names)
    devices = keras.distribution.list_devices()
    check_mesh(mesh_shape, axis_names, len(devices))
    check_batch_sizes(mesh_shape, batch_sizes)
    data_axis, model_axis = axis_names
    if mesh_shape[1] == 1:
        # DataParallel wants a 1-D mesh (a 2-D one trips a bad warnings.warn
        # call in Keras 3.15).
        mesh = keras.distribution.DeviceMesh((mesh_shape[0],), [data_axis], devices)
        # Each host feeds its own rows of every global batch (hosts.local_rows).
        return keras.distribution.DataParallel(device_mesh=mesh, auto_shard_dataset=False)
    mesh = keras.distribution.DeviceMesh(tuple(mesh_shape), axis_names, devices)
    axes_by_weight = layout_axes(data_axis, model_axis)
    check_shardable(axes_by_weight, weight_dims, mesh_shape, axis_names)
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in {**axes_by_weight, **lora_layout_axes(axes_by_weight)}.items():
        layout_map[key] = axes
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name=data_axis, auto_shard_dataset=False
    )


def data_sharding(shape):
    """The sharding of a global batch of `shape` under the distribution in
    force: rows over the data axis."""
    import keras

    return keras.distribution.distribution().get_data_layout(shape).backend_layout


def shard_heads_by_rows(x, kv_heads):
    """Traced `x` whose first axis is (key/value heads × rows), the
    decoder's cache layout, with that axis split over both mesh axes, the
    model axis first: each device holds an equal share of the (head, row)
    pairs, its model-axis block of heads and on a data axis a part of that.
    Left to itself, on a mesh of both axes XLA kept every row of its heads
    on every device (the cache and the attention data-axis times larger)."""
    import jax
    import keras

    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.ModelParallel):
        return x
    mesh = data_sharding(x.shape).mesh
    data_axis = distribution.batch_dim_name
    (model_axis,) = (name for name in mesh.axis_names if name != data_axis)
    rows = x.shape[0] // kv_heads
    if kv_heads % mesh.shape[model_axis] or rows % mesh.shape[data_axis]:
        return x
    spec = jax.sharding.PartitionSpec((model_axis, data_axis))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


@contextlib.contextmanager
def without_distribution():
    """No Keras distribution inside the block (one set for the process,
    a loaded model's, would give the variables its layouts)."""
    import keras

    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)
