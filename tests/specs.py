"""Model specs the tests share: the tiny Gemma stand-in and Gemma 7B."""

from pipeline.models.families import gemma
from pipeline.models.families.family import ModelSpec
from pipeline.models.tiny import BACKBONE_CONFIG

GEMMA_TINY = ModelSpec(gemma.FAMILY, BACKBONE_CONFIG)
GEMMA_7B = ModelSpec(gemma.FAMILY, gemma.FAMILY.architectures["gemma_7b"])
