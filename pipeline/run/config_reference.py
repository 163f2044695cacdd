"""The configuration page's table of keys: every key of the config, its
default (the base config) and what it means, read from the comments beside
the fields of `pipeline/run/config.py`, so that the page and the code say
the same.

Example:
```python
print(markdown_keys(config_keys()))
```
"""

import dataclasses
import inspect
import io
import tokenize

import yaml

from pipeline.run.config import Config


def config_keys():
    """[(key, default, meaning)] for every field of every section, in order."""
    rows = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory().__class__
        comments = field_comments(cls)
        defaults = dataclasses.asdict(section.default_factory())
        for field in dataclasses.fields(cls):
            rows.append(
                (f"{section.name}.{field.name}", defaults[field.name], comments.get(field.name, ""))
            )
    return rows


def field_comments(cls):
    """{field name: its comment}: the comment lines right above the field
    and the comment at the end of its line, joined."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments, above, last_field = {}, [], None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            own_line = lines[token.start[0] - 1].lstrip().startswith("#")
            if own_line:
                above.append(text)
            elif last_field:
                comments[last_field] = " ".join(filter(None, [comments.get(last_field), text]))
        elif token.type == tokenize.NAME and token.start[1] == 4 and _is_field(lines, token):
            last_field = token.string
            comments[last_field] = " ".join(above)
            above = []
        elif token.type == tokenize.NL and not lines[token.start[0] - 1].strip():
            above = []  # a blank line ends a comment block
    return {name: text for name, text in comments.items() if text}


def _is_field(lines, token):
    rest = lines[token.start[0] - 1][token.end[1] :]
    return rest.startswith(":")


def _default(value):
    if isinstance(value, str) and "\n" in value:
        return "(the reference's template: pipeline/text/templates.py)"
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


def markdown_keys(rows):
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in rows:
        cells = [f"`{key}`", f"`{_default(default)}`", meaning]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
