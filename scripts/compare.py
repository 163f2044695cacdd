"""Compare report: score each way of building the final prompt -> <run>/compare/compare.json."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.stages.compare", "run_compare_stage")
