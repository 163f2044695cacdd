"""Prints the model table of docs/models.md: per family and architecture, the meshes it
shards on and whether the Kaggle TPU v3-8, TPU v5e-8 and 2 x T4 configs hold
it, by the memory plan (their batch sizes and lengths).

No download, no device: the families' published architectures (pipeline/models/families/).
"""

from pipeline.models.model_table import TARGET_CONFIGS, markdown_table, model_table
from pipeline.run.config import load_config

if __name__ == "__main__":
    print(
        markdown_table(
            model_table({name: load_config(path) for name, path in TARGET_CONFIGS.items()})
        )
    )
