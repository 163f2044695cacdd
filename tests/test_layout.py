"""The shape of the library: layers import downwards only, stages stand side
by side, and the Kaggle notebook's path needs no Keras, JAX or TensorFlow."""

import ast
import subprocess
import sys

import pytest
from processes import ROOT

PACKAGE = ROOT / "pipeline"
ROOT_MODULES = {"errors", "keras_internals"}  # every layer may import these
# What each subpackage may import besides itself and the root modules.
MAY_IMPORT = {
    "parallel": set(),
    "text": {"parallel"},
    "run": {"parallel", "text"},
    "models": {"parallel", "text", "run"},
    "stages": {"parallel", "text", "run", "models"},
    "workflows": {"parallel", "text", "run", "models", "stages"},
    "kaggle": {"text"},
}
STAGES = {"data", "finetune", "mean_prompt", "predict", "score", "compare", "export", "bundle"}
KERAS_STACK = {
    "keras",
    "keras_hub",
    "keras_nlp",
    "jax",
    "jaxlib",
    "tensorflow",
    "tensorflow_text",
    "tensorflow_hub",
    "tf_keras",
}


def all_modules():
    """'pipeline.text.rules'-style names of every module of the package."""
    return sorted(
        ".".join(("pipeline", *path.relative_to(PACKAGE).with_suffix("").parts))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    )


def source(module):
    return (ROOT / (module.replace(".", "/") + ".py")).read_text()


def imports(module):
    """(pipeline modules, other top-level packages) that `module` imports,
    at the top or inside a function."""
    known = set(all_modules())
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(source(module))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (
                    inside.add(alias.name)
                    if alias.name.startswith("pipeline.")
                    else outside.add(alias.name.split(".")[0])
                )
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module == "pipeline" or node.module.startswith("pipeline."):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    inside.add(submodule if submodule in known else node.module)
            else:
                outside.add(node.module.split(".")[0])
    return inside - {"pipeline"}, outside


def reachable(module):
    seen, todo = set(), [module]
    while todo:
        for name in imports(todo.pop())[0] - seen:
            seen.add(name)
            todo.append(name)
    return seen


def layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) >= 3 else None


def test_every_module_sits_in_a_layer():
    loose = {m.split(".")[1] for m in all_modules() if layer(m) is None}
    assert loose == ROOT_MODULES
    assert {layer(m) for m in all_modules()} - {None} == set(MAY_IMPORT)


@pytest.mark.parametrize("module", [m for m in all_modules() if layer(m)])
def test_layers_import_only_downwards(module):
    allowed = MAY_IMPORT[layer(module)] | {layer(module), None}
    wrong = {name for name in imports(module)[0] if layer(name) not in allowed}
    assert not wrong, (
        f"{module} imports {sorted(wrong)}; it may import {sorted(allowed - {None})} and the root"
    )


def test_root_modules_import_no_layer():
    for name in ROOT_MODULES:
        assert not imports(f"pipeline.{name}")[0], name


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_module_imports_another(stage):
    others = {f"pipeline.stages.{other}" for other in STAGES - {stage}}
    assert not reachable(f"pipeline.stages.{stage}") & others


def test_compare_score_and_mean_prompt_need_no_model_code():
    for stage in ("compare", "score", "mean_prompt"):
        found = reachable(f"pipeline.stages.{stage}")
        assert not {m for m in found if layer(m) == "models" or m.endswith(".distribution")}, stage


def test_the_kaggle_path_imports_no_keras_jax_or_tensorflow():
    for module in [m for m in all_modules() if layer(m) == "kaggle"]:
        for name in {module} | reachable(module):
            assert not imports(name)[1] & KERAS_STACK, name
        loaded = subprocess.run(
            [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert not {name.split(".")[0] for name in loaded} & KERAS_STACK, module
