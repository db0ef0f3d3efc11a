"""Unit tests of the releases' decisions (plugins/filter/release.py): what makes a new release,
where it lives, which releases a host keeps. Expected values are written out by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import release  # noqa: E402

BASE = dict(app_kind="directory", source="/home/ops/celery-stack/examples/demo_app", source_digest="d1",
            celery_version="5.7.0", celery_extras=["redis"], pip_packages=["sentry-sdk==2.19.0"],
            pip_extra_args="", python="python3", python_version="3.13.5", import_path="/etc/celery-stack/python")


def _id(**changes):
    return release.release_id(release.release_spec(**{**BASE, **changes}))


def test_the_spec_names_what_defines_a_release():
    spec = release.release_spec(**BASE)
    assert spec["celery"] == "celery[redis]==5.7.0"
    assert spec["app"] == {"kind": "directory", "name": "demo_app", "digest": "d1"}
    assert spec["python_version"] == "3.13.5"
    assert release.release_spec(**{**BASE, "celery_extras": []})["celery"] == "celery==5.7.0"
    assert release.release_spec(**{**BASE, "app_kind": "requirement", "source": "acme==1.2"})["app"] == {
        "kind": "requirement", "requirement": "acme==1.2"}
    with pytest.raises(ValueError):
        release.release_spec(**{**BASE, "app_kind": "svn"})


def test_pip_arguments_count_by_their_digest_only():
    spec = release.release_spec(**{**BASE, "pip_extra_args": "--index-url https://u:tok3n@pypi.example/simple"})
    assert "tok3n" not in repr(spec)
    assert _id(pip_extra_args="--index-url https://u:tok3n@pypi.example/simple") != _id()


def test_the_same_inputs_give_the_same_release_any_change_a_new_one():
    first = _id()
    assert len(first) == 16 and int(first, 16) >= 0
    assert _id() == first
    # the controller's checkout path and the order of the extras do not matter
    assert _id(source="/srv/elsewhere/demo_app/") == first
    assert _id(celery_extras=["redis", "redis"]) == first
    for change in ({"source_digest": "d2"}, {"celery_version": "5.7.1"}, {"celery_extras": ["redis", "sqs"]},
                   {"pip_packages": []}, {"pip_extra_args": "--no-binary :all:"}, {"python": "python3.13"},
                   {"python_version": "3.13.6"}, {"import_path": "/etc/other"}):
        assert _id(**change) != first, change


def test_layout():
    assert release.release_layout("/opt/celery-stack/", "abc") == {
        "releases": "/opt/celery-stack/releases", "current": "/opt/celery-stack/current",
        "root": "/opt/celery-stack/releases/abc", "venv": "/opt/celery-stack/releases/abc/venv",
        "src": "/opt/celery-stack/releases/abc/src", "dist": "/opt/celery-stack/releases/abc/dist",
        "digest": "/opt/celery-stack/releases/abc/digest"}


def _releases(*pairs):
    return [{"id": name, "built": built, "intact": built is not None} for name, built in pairs]


def test_prune_keeps_the_wanted_the_previous_live_and_the_newest_others():
    found = _releases(("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0), ("new", 5.0))
    # switch d -> new, 2 kept: d (the workers' release until their restart) and c
    assert release.releases_to_prune(found, "d", "new", 2) == ["a", "b"]
    # the previous live one is kept even when it is the oldest
    assert release.releases_to_prune(found, "a", "new", 2) == ["b", "c"]
    assert release.releases_to_prune(found, "a", "new", 1) == ["b", "c", "d"]
    # nothing switched (new is live): the newest others are the rollback
    assert release.releases_to_prune(found, "new", "new", 2) == ["a", "b"]
    # never the live nor the wanted one, even with 0 asked (1 is the least)
    assert release.releases_to_prune(found, "d", "new", 0) == ["a", "b", "c"]


def test_prune_drops_incomplete_releases_but_never_the_wanted_one():
    found = _releases(("broken", None), ("old", 1.0), ("new", None))
    assert release.releases_to_prune(found, "old", "new", 2) == ["broken"]
    assert release.releases_to_prune(found, None, "new", 2) == ["broken"]
    assert release.releases_to_prune([], None, "new", 2) == []
