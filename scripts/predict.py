"""Predict stage: recover prompts for a competition CSV -> <run>/predict/submission.csv."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.stages.predict", "run_predict_stage")
