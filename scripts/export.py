"""Export stage: the run's adapter merged into the model, in Hugging Face
transformers format, and alone in PEFT's -> <run>/export/."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.stages.export", "run_export_stage")
