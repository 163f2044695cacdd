"""Mean-prompt stage: beam search for one high-scoring prompt
-> <run>/mean_prompt/mean_prompt.txt."""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.stages.mean_prompt", "run_mean_prompt_stage")
