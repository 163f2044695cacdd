"""Memory and disk plans: per-device memory of a config's training and
generation, and what its run writes; whether each fits.

Reads only the model's config.json (no weights, no devices needed).
"""

import _cli

if __name__ == "__main__":
    cfg = _cli.parse(__doc__.splitlines()[0])
    from pipeline.models.disk import plan_disk
    from pipeline.models.memory import plan_memory
    from pipeline.models.model import read_model_spec

    spec = read_model_spec(cfg.model.preset)
    print(f"model: {cfg.model.preset} ({spec.family.name})")
    print(plan_memory(cfg, spec).report())
    print(plan_disk(cfg, spec).report())
