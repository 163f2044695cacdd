"""Sweep: finetune for every combination of a grid of overrides, each a run
of its own, and a table and plot of their validation scores.

    python scripts/sweep.py --config configs/kaggle_tpu_v5e_8.yaml \\
        lora.rank=[2,4,16,64] train.learning_rate=[1e-4,2e-4] train.epochs=2

An override whose value is a list of what its key takes is an axis of the
grid (`lora.target_layers=[[query,value],[query,key,value]]` for a key that
takes a list); the others apply to every run.
"""

import _cli

if __name__ == "__main__":
    cfg, axes = _cli.parse(__doc__, grid=True)
    from pipeline.workflows.sweep import run_sweep

    _cli.run_or_exit(lambda cfg: run_sweep(cfg, axes), cfg)
