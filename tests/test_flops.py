import numpy as np
import pytest
from specs import GEMMA_7B, GEMMA_TINY

from pipeline.models import flops


def test_parameter_count_matches_the_built_backbone(tiny_model):
    """Gemma ties its embeddings: every weight but the norms is a matmul's."""
    causal_lm, _ = tiny_model
    weights = [
        w
        for w in causal_lm.backbone.weights
        if "lora" not in w.path and not w.path.endswith("scale")
    ]
    assert flops.matmul_parameter_count(GEMMA_TINY) == sum(int(np.prod(w.shape)) for w in weights)


def test_gemma_7b_is_8_5_billion_parameters():
    assert flops.matmul_parameter_count(GEMMA_7B) == pytest.approx(8.54e9, rel=0.01)


def test_training_flops_and_mfu():
    n = flops.matmul_parameter_count(GEMMA_TINY)
    d = GEMMA_TINY.dims
    attention = 12 * d.num_layers * 512 * d.num_query_heads * d.head_dim
    assert flops.train_flops_per_token(GEMMA_TINY, 512) == 4 * n + attention
    assert flops.train_flops_per_token(GEMMA_TINY, 512, frozen=False) == 6 * n + attention
    assert flops.mfu(1000, 1e9, 1.0, 2) == pytest.approx(0.5)
    assert flops.mfu(1000, 1e9, 0.0, 2) is None
