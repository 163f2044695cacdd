"""The Orbax checkpoint store: what it saves, where it restores it (another
mesh's shardings), how many it keeps, and what it refuses."""

import numpy as np
import pytest

from pipeline.parallel.checkpoint import CheckpointMismatch, CheckpointStore, Progress

SETTINGS = {"train.seed": 0, "lora": {"rank": 4}}


def sharded_model(mesh_shape, kernel_axes, seed):
    """A two-layer Keras model with AdamW built, its kernels laid out on
    `mesh_shape` as `kernel_axes` says, every value drawn from `seed`."""
    import keras

    mesh = keras.distribution.DeviceMesh(
        mesh_shape, ["batch", "model"], keras.distribution.list_devices()
    )
    layout = keras.distribution.LayoutMap(mesh)
    layout[".*dense_.*/kernel"] = kernel_axes
    distribution = keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
    with distribution.scope():
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(32, name="dense_a"),
                keras.layers.Dense(8, name="dense_b"),
            ]
        )
        model.compile(optimizer=keras.optimizers.AdamW(), loss="mse")
        model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(seed)
    for variable in list(model.trainable_variables) + list(model.optimizer.variables):
        variable.assign(rng.normal(size=variable.shape).astype(variable.dtype))
    return model


def values(model):
    return [
        np.asarray(v.value)
        for v in list(model.trainable_variables) + list(model.optimizer.variables)
    ]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_checkpoint_restores_on_another_mesh_in_the_models_shardings(tmp_path, request, where):
    folder = (
        tmp_path / "checkpoints"
        if where == "local"
        else f"{request.getfixturevalue('gcs_bucket')}/{tmp_path.name}"
    )
    written = sharded_model((1, 8), (None, "model"), seed=1)
    assert tuple(written.get_layer("dense_a").kernel.value.sharding.spec) == (None, "model")
    store = CheckpointStore(folder, SETTINGS, keep=2)
    store.save(written, Progress(step=3, step_losses=[3.0, 2.0, 1.0], epochs={"val_loss": [0.5]}))
    store.close()

    restored = sharded_model((2, 4), ("model", "batch"), seed=2)
    assert not all(
        np.array_equal(a, b) for a, b in zip(values(written), values(restored), strict=True)
    )
    progress = CheckpointStore(folder, SETTINGS, keep=2).restore(restored)
    assert progress == Progress(step=3, step_losses=[3.0, 2.0, 1.0], epochs={"val_loss": [0.5]})
    for a, b in zip(values(written), values(restored), strict=True):
        np.testing.assert_array_equal(b, a)
    kernel = restored.get_layer("dense_a").kernel.value
    assert tuple(kernel.sharding.mesh.shape.values()) == (2, 4)
    assert tuple(kernel.sharding.spec) == (
        "model",
        "batch",
    )  # the new model's layout, not the writer's


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_the_newest_checkpoints_are_kept_and_the_newest_restored(tmp_path, request, where):
    from etils import epath

    folder = (
        tmp_path if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/{tmp_path.name}"
    )
    model = sharded_model((1, 8), (None, "model"), seed=1)
    store = CheckpointStore(folder, SETTINGS, keep=2)
    for step in (2, 4, 6):
        model.get_layer("dense_b").bias.assign(np.full(8, step, "float32"))
        store.save(model, Progress(step=step))
    store.close()
    assert sorted(int(p.name) for p in epath.Path(folder).iterdir() if p.name.isdigit()) == [4, 6]
    assert CheckpointStore(folder, SETTINGS, keep=2).restore(model).step == 6
    np.testing.assert_array_equal(
        np.asarray(model.get_layer("dense_b").bias.value), np.full(8, 6.0)
    )


def test_no_checkpoint_restores_nothing(tmp_path):
    model = sharded_model((1, 8), (None, "model"), seed=1)
    before = values(model)
    assert CheckpointStore(tmp_path / "none", SETTINGS, keep=1).restore(model) is None
    for a, b in zip(before, values(model), strict=True):
        np.testing.assert_array_equal(b, a)


def test_other_settings_or_other_variables_are_refused(tmp_path):
    model = sharded_model((1, 8), (None, "model"), seed=1)
    store = CheckpointStore(tmp_path, SETTINGS, keep=1)
    store.save(model, Progress(step=1))
    store.close()
    with pytest.raises(
        CheckpointMismatch, match=r"other settings \(lora: \{'rank': 4\} then, \{'rank': 8\} now\)"
    ):
        CheckpointStore(tmp_path, dict(SETTINGS, lora={"rank": 8}), keep=1).restore(model)

    import keras

    wider = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, name="dense_a"),
            keras.layers.Dense(8, name="dense_b"),
        ]
    )
    wider.compile(optimizer=keras.optimizers.AdamW(), loss="mse")
    wider.optimizer.build(wider.trainable_variables)
    with pytest.raises(
        CheckpointMismatch,
        match=r"other variables than the model's \(sequential\w*/dense_a/kernel \[16, 32\] "
        r"then, sequential\w*/dense_a/kernel \[16, 64\] now\)",
    ):
        CheckpointStore(tmp_path, SETTINGS, keep=1).restore(wider)
