"""Every celery_stack.core.<name> the bundle uses resolves to exactly one plugin of the collection.

Ansible finds a filter by its name in any file of plugins/filter (each file's FilterModule), an
action by its file name in plugins/action: a filter moved between files keeps working as long as
some FilterModule still returns it, and two files returning the same name would leave it to
chance which one runs. Run by `make test`.
"""

import importlib
import re
import sys
from pathlib import Path

COLLECTION = Path(__file__).resolve().parents[2]
ROOT = COLLECTION.parents[3]
sys.path.insert(0, str(COLLECTION.parents[2]))

# Where the roles, playbooks, tests and docs name the collection's plugins.
USED_IN = ("roles", "playbooks", "molecule", "inventories", "examples", "site.yml", "README.md")
SUFFIXES = {".yml", ".yaml", ".j2", ".py", ".md"}
USE = re.compile(r"celery_stack\.core\.([a-z_]+)")


def _filters():
    """{filter name: [the files whose FilterModule returns it]}."""
    found = {}
    for path in sorted((COLLECTION / "plugins/filter").glob("*.py")):
        module = importlib.import_module(f"ansible_collections.celery_stack.core.plugins.filter.{path.stem}")
        for name in module.FilterModule().filters():
            found.setdefault(name, []).append(path.name)
    return found


def _uses():
    """{name: first file that uses celery_stack.core.<name>} over the bundle (Python imports of
    ansible_collections.celery_stack.core.plugins... aside)."""
    uses = {}
    for entry in USED_IN:
        top = ROOT / entry
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.suffix in SUFFIXES)
        for path in paths:
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            for name in USE.findall(path.read_text(encoding="utf-8", errors="replace")):
                if name != "plugins":
                    uses.setdefault(name, str(path.relative_to(ROOT)))
    return uses


def test_each_filter_name_is_returned_by_one_file_only():
    assert {name: files for name, files in _filters().items() if len(files) > 1} == {}


def test_every_name_the_bundle_uses_is_a_plugin_of_the_collection():
    actions = {p.stem for p in (COLLECTION / "plugins/action").glob("*.py")}
    known = set(_filters()) | actions
    uses = _uses()
    assert len(uses) > 40  # the roles' filters were found at all
    assert {name: where for name, where in uses.items() if name not in known} == {}
