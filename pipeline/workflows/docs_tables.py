"""The tables of docs/ that a program computes, and where each lives.

Each table sits in its page between `<!-- NAME -->` and `<!-- /NAME -->`;
`make docs-tables` writes them there, and tests/test_docs.py keeps the pages
equal to what the code computes.

Example:
```python
for page, name, table in computed_tables():
    print(page, name, table.count("\\n"))
write_tables(Path("."))
```
"""

from pathlib import Path

from pipeline.models.model_table import TARGET_CONFIGS, markdown_table, model_table
from pipeline.models.plan_table import config_plans, markdown_plans
from pipeline.run.config import load_config
from pipeline.run.config_reference import config_keys, markdown_keys


def computed_tables(root=Path(".")):
    """[(page, name, markdown)] for every computed table of docs/."""
    targets = {name: load_config(root / path) for name, path in TARGET_CONFIGS.items()}
    configs = {path.stem: load_config(path) for path in sorted((root / "configs").glob("*.yaml"))}
    return [
        ("docs/models.md", "model-table", markdown_table(model_table(targets))),
        ("docs/configuration.md", "config-keys", markdown_keys(config_keys())),
        ("docs/configuration.md", "config-plans", markdown_plans(config_plans(configs))),
    ]


def table_in_page(text, name):
    """The text between the page's markers of `name`."""
    start, end = f"<!-- {name} -->\n", f"\n<!-- /{name} -->"
    if start not in text or end not in text:
        raise ValueError(f"no {start.strip()} ... {end.strip()} markers")
    return text.split(start, 1)[1].split(end, 1)[0]


def write_tables(root=Path(".")):
    """Writes every computed table into its page; returns the pages changed."""
    changed = []
    for page, name, table in computed_tables(root):
        path = root / page
        text = path.read_text()
        old = table_in_page(text, name)
        if old != table:
            path.write_text(
                text.replace(f"<!-- {name} -->\n{old}\n", f"<!-- {name} -->\n{table}\n")
            )
            changed.append(page)
    return changed
