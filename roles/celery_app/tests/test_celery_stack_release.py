"""Unit tests of the host-side release tool (files/opt/celery-stack/bin/celery-stack-release):
when a release counts as intact, what a build installs, the atomic switch. Its builds run for real
in the default scenario (molecule/default/tests/test_release_switch.py). Run by test.sh unit."""

import importlib.machinery
import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "files/opt/celery-stack/bin/celery-stack-release"
loader = importlib.machinery.SourceFileLoader("celery_stack_release", str(SCRIPT))
tool = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
loader.exec_module(tool)


def _release(base, name, digest=True):
    root = base / "releases" / name
    (root / "venv" / "lib" / "site-packages" / "pkg").mkdir(parents=True)
    (root / "venv" / "lib" / "site-packages" / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "venv" / "lib" / "site-packages" / "gone.py").write_text("")
    (root / "venv" / "lib64").symlink_to("lib")
    (root / "src").mkdir()
    (root / "src" / "manage.py").write_text("print()\n")
    if digest:
        (root / "digest").write_text(tool.tree_digest(str(root)) + "\n")
    return root


def _state(base, name):
    return next(r for r in tool.status(str(base))["releases"] if r["id"] == name)


def test_a_release_is_intact_until_a_file_is_deleted_or_changed(tmp_path):
    root = _release(tmp_path, "r1")
    assert _state(tmp_path, "r1")["intact"] is True
    # what Python writes at run time, and the build log, do not count
    (root / "venv" / "lib" / "site-packages" / "pkg" / "__pycache__").mkdir()
    (root / "venv" / "lib" / "site-packages" / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (root / "build.log").write_text("pip output\n")
    assert _state(tmp_path, "r1")["intact"] is True
    (root / "venv" / "lib" / "site-packages" / "gone.py").unlink()
    assert _state(tmp_path, "r1")["intact"] is False


@pytest.mark.parametrize("damage", ["content", "mode", "link", "empty_dir", "new_file"])
def test_every_kind_of_drift_shows(tmp_path, damage):
    root = _release(tmp_path, "r1")
    package = root / "venv" / "lib" / "site-packages" / "pkg"
    if damage == "content":
        (package / "__init__.py").write_text("x = 2\n")
    elif damage == "mode":
        (root / "src" / "manage.py").chmod(0o777)
    elif damage == "link":
        (root / "venv" / "lib64").unlink()
        (root / "venv" / "lib64").symlink_to("/usr/lib")
    elif damage == "empty_dir":
        (root / "venv" / "lib" / "site-packages" / "extra").mkdir()
    else:
        (root / "src" / "local_settings.py").write_text("DEBUG = True\n")
    assert _state(tmp_path, "r1")["intact"] is False


def test_status_lists_the_live_release_and_incomplete_ones(tmp_path):
    _release(tmp_path, "r1")
    _release(tmp_path, "r2", digest=False)  # a build that failed: no digest
    (tmp_path / "releases" / ".current.123").symlink_to("r1")  # not a release
    (tmp_path / "current").symlink_to("releases/r1")
    (tmp_path / "venv").symlink_to(str(tmp_path / "current" / "venv"))
    found = tool.status(str(tmp_path), str(tmp_path / "venv"))
    assert found["live"] == "r1"
    assert [(r["id"], r["built"] is not None, r["intact"]) for r in found["releases"]] == [
        ("r1", True, True), ("r2", False, False)]
    assert found["venv"] == {"kind": "link", "link": str(tmp_path / "current" / "venv")}
    assert found["python_version"].count(".") == 2
    assert tool.status(str(tmp_path / "none"), str(tmp_path / "none" / "venv")) == {
        "python_version": found["python_version"], "live": None, "releases": [],
        "venv": {"kind": "missing", "link": None}}
    (tmp_path / "old-venv").mkdir()
    assert tool.status(str(tmp_path), str(tmp_path / "old-venv"))["venv"]["kind"] == "directory"


def test_switch_replaces_the_live_link_and_refuses_an_incomplete_release(tmp_path):
    _release(tmp_path, "r1")
    _release(tmp_path, "r2")
    _release(tmp_path, "broken", digest=False)
    tool.switch(str(tmp_path), "r1")
    tool.switch(str(tmp_path), "r2")
    assert os.readlink(tmp_path / "current") == "releases/r2"
    with pytest.raises(SystemExit, match="not a complete release"):
        tool.switch(str(tmp_path), "broken")
    assert os.readlink(tmp_path / "current") == "releases/r2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "releases"]  # no temporary link left


def test_what_a_build_installs_per_kind_of_source(tmp_path):
    root = tmp_path / "r"
    (root / "src").mkdir(parents=True)
    (root / "dist").mkdir()
    pin = ["celery[redis]==5.7.0"]
    assert tool.install_args(str(root), "requirement", "acme==1.2", pin) == (pin + ["acme==1.2"], None)
    assert tool.install_args(str(root), "file", "acme-1.2.tar.gz", pin) == (pin + [f"{root}/dist/acme-1.2.tar.gz"], None)
    # a Django project without packaging: its requirements, and the directory on the import path
    (root / "src" / "manage.py").write_text("")
    assert tool.project_kind(str(root / "src")) == "unpackaged"
    assert tool.install_args(str(root), "directory", "", pin) == (pin, f"{root}/src")
    (root / "src" / "requirements.txt").write_text("Django==5.2.19\n")
    assert tool.install_args(str(root), "directory", "", pin) == (pin + ["-r", f"{root}/src/requirements.txt"], f"{root}/src")
    # a packaged project: the wheel built into dist/
    (root / "src" / "pyproject.toml").write_text("[project]\nname = 'acme'\n")
    (root / "dist" / "acme-1.0-py3-none-any.whl").write_bytes(b"")
    assert tool.project_kind(str(root / "src")) == "packaged"
    assert tool.install_args(str(root), "directory", "", pin) == (pin + [f"{root}/dist/acme-1.0-py3-none-any.whl"], None)


def test_build_artefacts_are_removed_from_a_copied_source(tmp_path):
    for path in ("build/lib/old.py", "acme.egg-info/PKG-INFO", "acme/__pycache__/a.pyc", ".git/HEAD", "acme/a.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    tool.remove_artefacts(str(tmp_path))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["acme", "acme/a.py"]


def test_the_cli_prints_the_status_as_json(tmp_path, capsys):
    _release(tmp_path, "r1")
    tool.main(["--base", str(tmp_path), "status"])
    assert json.loads(capsys.readouterr().out)["releases"][0]["id"] == "r1"
    tool.main(["--base", str(tmp_path), "list"])
    assert "r1" in capsys.readouterr().out
