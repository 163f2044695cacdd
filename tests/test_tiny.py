"""The stand-ins are built once and kept while what they are built from
stays the same; a change to the builder builds them again."""

from pipeline.models.tiny import builder_key, clear_if_built_otherwise


def test_stand_ins_are_kept_while_their_builder_is_the_same(tmp_path):
    root = tmp_path / "tiny"
    clear_if_built_otherwise(root, 300, log=print)
    (root / "gemma_tiny").mkdir()
    clear_if_built_otherwise(root, 300, log=print)
    assert (root / "gemma_tiny").exists()
    assert (root / "builder.key").read_text() == builder_key(300)


def test_stand_ins_built_from_other_inputs_are_built_again(tmp_path):
    root = tmp_path / "tiny"
    said = []
    clear_if_built_otherwise(root, 300, log=said.append)
    (root / "gemma_tiny").mkdir()
    clear_if_built_otherwise(root, 100, log=said.append)  # other pre-training steps
    assert not (root / "gemma_tiny").exists() and root.exists()
    assert said == [f"tiny: {root} was built from other inputs (builder.key); building it again"]
    (root / "gemma_tiny").mkdir()
    (root / "builder.key").unlink()  # built before keys were kept
    clear_if_built_otherwise(root, 100, log=said.append)
    assert not (root / "gemma_tiny").exists()
