"""Builds the embedded default's stand-ins under artifacts/tiny/ (skips what exists).

A tiny Gemma preset (SentencePiece tokenizer trained on demo/texts.txt,
pre-trained briefly on it), one of every other model family
(`<family>_tiny/`, a tokenizer of the family's kind) and a stand-in sentence
encoder SavedModel with the sentence-t5 call signature. Deterministic:
fixed seeds.
"""

import argparse

from pipeline.models.tiny import TINY_DIR
from pipeline.parallel.runtime import setup_environment
from pipeline.run.config import DistributionConfig

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TINY_DIR))
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument(
        "--default-only",
        action="store_true",
        help="only what the embedded default uses (the tiny Gemma and the encoder)",
    )
    args = parser.parse_args()
    setup_environment(DistributionConfig(host_device_count=0))
    from pipeline.models.tiny import build_tiny_artifacts

    build_tiny_artifacts(
        args.out, pretrain_steps=args.pretrain_steps, other_families=not args.default_only
    )
