"""The pipeline's own input errors: what a user can fix.

A stage stops on one of these with a single line that names the file, row,
column or key and says what to do (`scripts/_cli.py`); any other exception,
e.g. one raised inside Keras, JAX, XLA or TensorFlow, keeps its traceback.

Example:
```python
raise InputError(f"{path}: row 3, column 'id': empty id; give every row an id")
raise MissingInputError(f"{path} not found; run the finetune stage first")
```
"""


class InputError(ValueError):
    """Bad input: a file, a value or a setting the user can change."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that is not there."""
