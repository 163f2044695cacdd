import keras
import numpy as np
import tensorflow as tf

from pipeline.runtime import set_seed


def test_set_seed_makes_keras_initialisers_repeat():
    def initial_kernel():
        layer = keras.layers.Dense(4)
        layer.build((None, 3))
        return np.asarray(layer.kernel.value)

    set_seed(7)
    first = initial_kernel()
    set_seed(7)
    np.testing.assert_array_equal(initial_kernel(), first)
    set_seed(8)
    assert not np.array_equal(initial_kernel(), first)


def test_set_seed_keeps_earlier_tokenizers_working(tiny_model):
    _, tokenizer = tiny_model
    tokenize = lambda: list(tf.data.Dataset.from_tensor_slices(["the old lighthouse"]).map(tokenizer))  # noqa: E731
    before = tokenize()
    set_seed(0)
    np.testing.assert_array_equal(tokenize()[0], before[0])


def test_private_keras_names_refuse_other_versions():
    import pytest

    from pipeline.keras_internals import check_versions

    check_versions({"keras": "3.15.1", "keras-hub": "0.32.0"})
    with pytest.raises(ImportError, match=r"supports keras 3\.15\.x and keras-hub 0\.32\.x .* found keras 3\.16\.0"):
        check_versions({"keras": "3.16.0", "keras-hub": "0.32.0"})


def test_no_module_but_the_door_touches_private_keras_names():
    import re
    from pathlib import Path

    private = re.compile(r"keras(_hub)?\.src|\._(lora_|flatten_layers|apply_rope|compute_attention|mask_sliding_window)")
    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("pipeline").glob("*.py")):
        if path.name != "keras_internals.py":
            assert not private.search(path.read_text()), path.name
