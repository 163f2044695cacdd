"""Kaggle bundle: wheels, code, adapter and settings for an offline notebook
-> <run>/kaggle_bundle/."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.stages.bundle", "run_kaggle_bundle_stage")
