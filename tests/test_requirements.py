"""The accelerator requirement files: the same pins but JAX's extra, and
nothing that makes pip reach past the package index."""

from processes import ROOT


def pins(name):
    lines = (ROOT / name).read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def test_the_gpu_list_is_the_tpu_list_with_cuda_jax():
    gpu, tpu = pins("requirements-gpu.txt"), pins("requirements-tpu.txt")
    assert "jax[cuda12]==0.10.2" in gpu and "jax[tpu]==0.10.2" in tpu
    assert [p for p in gpu if not p.startswith("jax[")] == [
        p for p in tpu if not p.startswith("jax[")
    ]


def test_no_requirement_file_adds_a_find_links_page():
    # libtpu is on PyPI; where an extra page is unreachable pip retries for minutes.
    for path in ROOT.glob("requirements-*.txt"):
        assert not [p for p in pins(path.name) if p.startswith(("-f", "--find-links"))], path.name
