"""Score stage: sharpened cosine similarity of predictions vs truth -> <run>/score/score.json."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.stages.score", "run_score_stage")
