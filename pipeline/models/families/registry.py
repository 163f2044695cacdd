"""The model families the pipeline runs, one module each in this folder
(see `family.py` for what a family declares). Adding a family is adding a
module and its `FAMILY` to `FAMILIES`.

Example:
```python
family = by_backbone_class("Gemma3Backbone")
family.chat_turn.format(content="Rewrite this ...")
```
"""

from pipeline.errors import InputError
from pipeline.models.families import gemma, gemma3, gemma4, llama3, mistral, qwen3

FAMILIES = {
    family.name: family
    for family in (
        gemma.FAMILY,
        gemma3.FAMILY,
        mistral.FAMILY,
        llama3.FAMILY,
        qwen3.FAMILY,
        gemma4.FAMILY,
    )
}


def by_backbone_class(class_name, preset=None):
    """The family whose KerasHub backbone is `class_name`."""
    for family in FAMILIES.values():
        if family.backbone_class == class_name:
            return family
    supported = ", ".join(f"{f.name} ({f.backbone_class})" for f in FAMILIES.values())
    raise InputError(
        f"model.preset {str(preset)!r} is a {class_name}, which the pipeline does not run; it runs "
        f"{supported}. "
        "Pick a preset of one of these (docs/models.md)"
    )
