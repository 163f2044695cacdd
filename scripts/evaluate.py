"""Evaluate: score and compare predict's rows, or, when they have no true prompts
(test.csv), the holdout rows of the training data (<run>/predict_holdout,
score_holdout, compare_holdout)."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.workflows.evaluate", "run_evaluate_stage")
