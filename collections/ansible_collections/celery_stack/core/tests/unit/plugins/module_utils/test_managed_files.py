"""Unit tests of what the action celery_stack.core.files decides (plugins/module_utils/managed_files.py).

The states below are shaped as ansible.builtin.find reports them (get_checksum: true)."""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.module_utils import managed_files as mf  # noqa: E402

UNIT = "[Service]\nExecStart=/bin/true\n"


def state(path, content=None, owner="root", group="root", mode="0644"):
    entry = {"path": path, "pw_name": owner, "gr_name": group, "mode": mode, "isdir": content is None,
             "islnk": False}
    if content is not None:
        entry["checksum"] = hashlib.sha1(content.encode()).hexdigest()
    return entry


FILE = {"dest": "/etc/systemd/system/x.service", "content": UNIT, "mode": "0644", "restarts": "workers"}
DIR = {"path": "/etc/celery-stack", "group": "celery", "mode": "0750"}


def test_find_reads_every_path_in_one_call():
    assert mf.find_args(["/etc/a/x.conf", "/etc/a/y.conf", "/etc/b/"]) == {
        "paths": ["/etc", "/etc/a"], "patterns": ["b", "x.conf", "y.conf"]}


def test_nothing_to_do_when_the_host_is_as_declared():
    found = [state(FILE["dest"], UNIT), state(DIR["path"], group="celery", mode="0750")]
    assert mf.plan([DIR], [FILE], found) == {"dirs": [], "files": []}


def test_a_missing_file_and_directory_are_written():
    assert mf.plan([DIR], [FILE], []) == {"dirs": [(DIR, ["missing"])], "files": [(FILE, ["missing"])]}


def test_a_changed_mode_alone_is_a_difference():
    """The acceptance case: the task's mode changes, the content does not."""
    found = [state(FILE["dest"], UNIT, mode="0644")]
    assert mf.plan([], [dict(FILE, mode="0600")], found)["files"] == [(dict(FILE, mode="0600"), ["mode"])]
    # the same mode written with and without the leading zero
    assert mf.plan([], [dict(FILE, mode="644")], found)["files"] == []


def test_content_owner_and_group_differences():
    found = [state(FILE["dest"], UNIT + "#", owner="celery", group="celery")]
    assert mf.plan([], [FILE], found)["files"] == [(FILE, ["content", "owner", "group"])]


def test_an_owner_or_group_of_none_is_left_as_found():
    """A package that chowns its configuration (RabbitMQ's /etc/rabbitmq) is not fought over."""
    unmanaged = dict(FILE, owner=None, group=None)
    found = [state(FILE["dest"], UNIT, owner="rabbitmq", group="rabbitmq")]
    assert mf.plan([], [unmanaged], found)["files"] == []
    assert mf.plan([], [dict(unmanaged, group="root")], found)["files"] == [(dict(unmanaged, group="root"), ["group"])]


def test_a_file_where_a_directory_belongs_and_the_reverse():
    assert mf.plan([DIR], [], [state(DIR["path"], "x", group="celery", mode="0750")])["dirs"] == [
        (DIR, ["not a directory"])]
    assert mf.plan([], [FILE], [state(FILE["dest"])])["files"] == [(FILE, ["content"])]


def test_restart_targets_of_the_changed_files_each_once():
    files = [{"restarts": "workers"}, {"restarts": "none"}, {}, {"restarts": "beat"}, {"restarts": "workers"}]
    assert mf.restarts(files) == ["workers", "beat"]
