"""The shape of the library: stages stand side by side."""

import ast

import pytest

from processes import ROOT

STAGES = ["data", "finetune", "mean_prompt", "predict", "score", "compare"]


def pipeline_imports(module):
    """Modules of `pipeline` that `module` imports, at the top or in a function."""
    tree = ast.parse((ROOT / "pipeline" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline."))
    return found


def reachable(module):
    seen, todo = set(), [module]
    while todo:
        for name in pipeline_imports(todo.pop()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_module_imports_another(stage):
    assert not (reachable(stage) & set(STAGES)) - {stage}


def test_compare_and_score_need_no_model_code():
    for stage in ("compare", "score", "mean_prompt"):
        assert not reachable(stage) & {"model", "decoding", "generation", "distribution"}, stage
