"""A slice's devices, hosts and runtime image follow its accelerator type,
and a config's mesh is checked against them before anything is created."""

import pytest

from pipeline.parallel.slices import SliceError, mesh_override, slice_of


@pytest.mark.parametrize(
    "accelerator_type, devices, hosts, runtime",
    [
        ("v3-8", 8, 1, "tpu-ubuntu2204-base"),
        ("v3-32", 32, 4, "tpu-ubuntu2204-base"),
        ("v4-32", 16, 4, "tpu-ubuntu2204-base"),  # megacore: two TensorCores, one device
        ("v5p-16", 8, 2, "v2-alpha-tpuv5"),
        ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),  # chips: eight on one host
        ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),  # then four to a host
        ("v6e-16", 16, 4, "v2-alpha-tpuv6e"),
    ],
)
def test_devices_hosts_and_runtime_follow_the_accelerator_type(
    accelerator_type, devices, hosts, runtime
):
    tpu = slice_of(accelerator_type)
    assert (tpu.devices, tpu.hosts, tpu.runtime) == (devices, hosts, runtime)
    assert tpu.mesh == [hosts, devices // hosts]


def test_a_runtime_given_replaces_the_generations():
    assert slice_of("v6e-16", runtime="v2-alpha-tpuv6e-next").runtime == "v2-alpha-tpuv6e-next"


def test_an_unknown_accelerator_type_names_the_known_ones():
    with pytest.raises(SliceError, match="v3-32, v4-32, v5litepod-16 or v6e-16"):
        slice_of("tpu7x-16")


def test_a_config_mesh_that_does_not_span_the_slice_gets_the_slices_own():
    tpu = slice_of("v4-32")
    assert mesh_override(tpu, [4, 4], set_on_command_line=False) is None
    assert mesh_override(tpu, [4, 8], set_on_command_line=False) == "distribution.mesh_shape=[4,4]"
    with pytest.raises(SliceError, match=r"spans 8 devices; v4-32: 16 devices .*\[4,4\]"):
        mesh_override(tpu, [2, 4], set_on_command_line=True)
