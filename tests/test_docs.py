"""The front door and the manual: the tables docs/ shows are the ones the
code computes, README.md stays short, every link resolves, and every
command README.md and docs/ show is one that runs: each `make` line as a
dry run (`make -n`) with its CONFIG and ARGS loaded as a config, each
launcher line as a dry run or its subcommand's --help."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from processes import ROOT

from pipeline.run.config import load_config, split_grid
from pipeline.workflows.docs_tables import computed_tables, table_in_page

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page, name, table", computed_tables(ROOT), ids=lambda x: str(x)[:24])
def test_computed_tables_are_the_pages(page, name, table):
    assert table_in_page((ROOT / page).read_text(), name) == table, (
        f"{page}'s {name} is out of date: run `make docs-tables`"
    )


def test_readme_is_the_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250, (
        "README.md is the front door: move the details to docs/"
    )


def slug(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                if anchor not in map(slug, headings):
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken


def documented_commands():
    """Every `make ...` and `python(3) scripts/...` line of the pages' bash
    blocks, and every inline `make ...` span, as (page, command)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].strip()
                if line.startswith(("make ", "python scripts/", "python3 scripts/")):
                    found.append((page.name, line))
        for span in re.findall(r"`(make [a-z][^`]*)`", text):
            found.append((page.name, span))
    return sorted(set(found))


def test_the_pages_show_commands():
    pages = {page for page, _ in documented_commands()}
    assert {"README.md", "getting-started.md", "kaggle.md", "cloud-tpu.md"} <= pages


@pytest.mark.parametrize("page, command", documented_commands())
def test_documented_command_runs(page, command):
    words = shlex.split(command)
    if words[0] == "make":
        settings = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        config = settings.get("CONFIG")
        overrides = settings.get("ARGS", "").split()
        if words[1] == "sweep":  # its overrides listing values are the grid
            overrides, _ = split_grid(overrides)
        load_config(ROOT / config if config else None, overrides)
        run = ["make", "-n", *words[1:]]
    elif "--dry-run" in words:
        run = [sys.executable, *words[1:]]
    else:  # a launcher step that would reach Cloud TPU: its options parse
        run = [sys.executable, words[1], words[2], "--help"]
    # A user with Kaggle credentials, which the launcher copies to the workers.
    env = dict(os.environ, KAGGLE_USERNAME="someone", KAGGLE_KEY="0123abcd")
    done = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{page}: {command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    modules = [
        path
        for path in (ROOT / "pipeline").rglob("*.py")
        if path.name != "__init__.py" and path.parent.name != "families"
    ]
    assert modules and [m.name for m in modules if m.name not in page] == []
