"""The stand-ins are built once per machine and kept while what they are
built from stays the same; a change to the builder builds them again."""

import fcntl

import pytest

from pipeline.models.tiny import builder_key, building, clear_if_built_otherwise, linked_to_store


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


def test_a_clone_without_stand_ins_links_to_the_machines_build_of_the_same_inputs(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PROMPT_RECOVERY_CACHE", str(tmp_path / "store"))
    first, second = tmp_path / "clone-1" / "tiny", tmp_path / "clone-2" / "tiny"
    assert linked_to_store(first, 300) == first and first.is_symlink()
    (first / "gemma_tiny").mkdir()  # built through the first clone's link
    linked_to_store(second, 300)
    assert (second / "gemma_tiny").exists()
    assert first.resolve() == tmp_path / "store" / "tiny" / builder_key(300)[:16]
    linked_to_store(second, 100)  # other inputs: another build, the first one kept
    assert second.resolve() != first.resolve() and not (second / "gemma_tiny").exists()
    assert (first / "gemma_tiny").exists()


def test_a_folder_of_its_own_is_built_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPT_RECOVERY_CACHE", str(tmp_path / "store"))
    own = tmp_path / "tiny"
    own.mkdir()
    assert linked_to_store(own, 300) == own and not own.is_symlink()
    assert not (tmp_path / "store").exists()


def test_one_process_builds_while_the_others_wait(tmp_path):
    folder = tmp_path / "tiny"
    with building(folder), open(tmp_path / ".tiny.lock") as other:
        with pytest.raises(BlockingIOError):  # what another process's building() waits on
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / ".tiny.lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the build is done
