"""Finetune stage: LoRA on Gemma for prompt recovery -> <run>/finetune/adapter.lora.h5."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.stages.finetune", "run_finetune_stage")
