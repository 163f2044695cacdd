"""The embedded-default demo: every stage on tiny stand-ins, then base vs fine-tuned.

Builds the tiny artifacts if needed, runs data -> finetune -> predict ->
score on the (1, 8) mesh of 8 virtual CPU devices, predicts the holdout rows
once more with the base model alone, and prints both scores side by side.
Takes the same --config and key=value overrides as the stage scripts.
"""

import _cli

if __name__ == "__main__":
    cfg = _cli.parse(__doc__.splitlines()[0])
    from pipeline.workflows.demo import run_demo

    _cli.run_or_exit(run_demo, cfg)
