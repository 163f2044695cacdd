import numpy as np
import pytest

from pipeline.models import flops
from pipeline.models.tiny import BACKBONE_CONFIG


def test_parameter_count_matches_the_built_backbone(tiny_model):
    causal_lm, _ = tiny_model
    weights = [w for w in causal_lm.backbone.weights if "lora" not in w.path and not w.path.endswith("scale")]
    assert flops.gemma_parameter_count(BACKBONE_CONFIG) == sum(int(np.prod(w.shape)) for w in weights)


def test_gemma_7b_is_8_5_billion_parameters():
    gemma_7b = dict(vocabulary_size=256000, num_layers=28, num_query_heads=16, num_key_value_heads=16,
                    hidden_dim=3072, intermediate_dim=49152, head_dim=256)
    assert flops.gemma_parameter_count(gemma_7b) == pytest.approx(8.54e9, rel=0.01)


def test_training_flops_and_mfu():
    n = flops.gemma_parameter_count(BACKBONE_CONFIG)
    attention = 12 * 2 * 512 * 8 * 16
    assert flops.train_flops_per_token(BACKBONE_CONFIG, 512) == 4 * n + attention
    assert flops.train_flops_per_token(BACKBONE_CONFIG, 512, frozen=False) == 6 * n + attention
    assert flops.mfu(1000, 1e9, 1.0, 2) == pytest.approx(0.5)
    assert flops.mfu(1000, 1e9, 0.0, 2) is None
