"""Memory plan: per-device memory of a config's training and generation, and whether it fits.

Reads only the model's config.json (no weights, no devices needed).
"""

import _cli

if __name__ == "__main__":
    cfg = _cli.parse(__doc__.splitlines()[0])
    from pipeline.memory import plan_memory
    from pipeline.model import read_backbone_config

    print(plan_memory(cfg, read_backbone_config(cfg.model.preset)).report())
