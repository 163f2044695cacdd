"""The Keras distribution for a run: device mesh, Gemma layout map, checks.

A (1, 8) ("batch", "model") mesh on a TPU v3-8 shards every Gemma weight
across the 8 cores (`ModelParallel`); a model axis of 1 is plain data
parallelism (`DataParallel`). Everything that can go wrong is checked before
any weight is loaded, with a message that says what to change.

Example:
```python
backbone_config = read_backbone_config("gemma_instruct_7b_en")
distribution = build_distribution(cfg.distribution, backbone_config, [cfg.train.batch_size])
keras.distribution.set_distribution(distribution)  # then from_preset(...)
```
"""

import re

from pipeline.errors import InputError


class DistributionError(InputError):
    """The mesh does not fit the devices or the model; the message says why."""


# Config field of each dimension of each Gemma weight, in weight order. The
# layout map shards some of them; each sharded one must divide evenly.
def gemma_weight_dims(config):
    """Maps a representative weight path to [(config field, size), ...]."""
    hidden = ("hidden_dim", config["hidden_dim"])
    ffw = ("intermediate_dim / 2", config["intermediate_dim"] // 2)
    head = ("head_dim", config["head_dim"])
    query = ("num_query_heads", config["num_query_heads"])
    kv = ("num_key_value_heads", config["num_key_value_heads"])
    block = "decoder_block_0"
    return {
        "token_embedding/embeddings": [("vocabulary_size", config["vocabulary_size"]), hidden],
        f"{block}/attention/query/kernel": [query, hidden, head],
        f"{block}/attention/key/kernel": [kv, hidden, head],
        f"{block}/attention/value/kernel": [kv, hidden, head],
        f"{block}/attention/attention_output/kernel": [query, head, hidden],
        f"{block}/ffw_gating/kernel": [hidden, ffw],
        f"{block}/ffw_gating_2/kernel": [hidden, ffw],
        f"{block}/ffw_linear/kernel": [ffw, hidden],
    }


def gemma_layout_axes(data_axis="batch", model_axis="model"):
    """KerasHub's Gemma layout map (GemmaBackbone.get_layout_map) as plain
    data: weight-path regex -> mesh axis of each dimension. Plain data so
    that checks and memory plans need no devices; a test pins it to
    KerasHub's."""
    return {
        "token_embedding/embeddings": (model_axis, data_axis),
        "decoder_block.*attention.*(query|key|value).kernel": (model_axis, data_axis, None),
        "decoder_block.*attention_output.kernel": (model_axis, None, data_axis),
        "decoder_block.*ffw_gating.kernel": (data_axis, model_axis),
        "decoder_block.*ffw_gating_2.kernel": (data_axis, model_axis),
        "decoder_block.*ffw_linear.kernel": (model_axis, data_axis),
    }


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


def check_shardable(layout_axes, backbone_config, mesh_shape, axis_names):
    """`layout_axes` maps layout-map regexes to axis-name tuples."""
    axis_size = dict(zip(axis_names, mesh_shape))
    for path, dims in gemma_weight_dims(backbone_config).items():
        for (field, size), axis in zip(dims, weight_axes(path, layout_axes)):
            if axis is not None and size % axis_size[axis]:
                raise DistributionError(
                    f"{field}={size} of the model does not divide by the "
                    f"'{axis}' mesh axis ({axis_size[axis]}), which shards {path}; "
                    f"choose a distribution.mesh_shape whose '{axis}' size divides "
                    f"{size} (e.g. [{mesh_shape[0] * mesh_shape[1]}, 1] for data "
                    "parallelism)"
                )


def build_distribution(distribution_cfg, backbone_config, batch_sizes):
    """Initialises multi-host JAX if configured, checks, returns the
    Keras distribution (not yet set)."""
    import keras
    import keras_hub

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
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(
        mesh, model_parallel_dim_name=model_axis, data_parallel_dim_name=data_axis
    )
    layout_axes = {key: tuple(layout_map[key].axes) for key in layout_map}
    check_shardable(layout_axes, backbone_config, mesh_shape, axis_names)
    for key, axes in lora_layout_axes(layout_axes).items():
        layout_map[key] = axes
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name=data_axis, auto_shard_dataset=False
    )


def data_sharding(shape):
    """The sharding of a global batch of `shape` under the distribution in
    force: rows over the data axis."""
    import keras

    return keras.distribution.distribution().get_data_layout(shape).backend_layout
