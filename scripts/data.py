"""Data stage: rewrite source chunks with sampled prompts -> <run>/data/rewrites.csv."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.stages.data", "run_data_stage")
