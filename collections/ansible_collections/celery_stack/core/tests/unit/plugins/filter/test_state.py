"""Unit tests of what a role reads before it acts (plugins/filter/state.py). find_args is the
files action's own, tested with it (module_utils/test_managed_files.py)."""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import state  # noqa: E402

def test_tree_digest_follows_content_and_mode(tmp_path):
    (tmp_path / "pkg").mkdir()
    module = tmp_path / "pkg" / "m.py"
    module.write_text("x = 1\n")
    first = state.tree_digest(str(tmp_path))
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"junk")
    assert state.tree_digest(str(tmp_path)) == first  # build artefacts do not count
    module.chmod(0o755)
    assert state.tree_digest(str(tmp_path)) != first
    module.write_text("x = 2\n")
    assert state.tree_digest(str(tmp_path)) != first
    assert state.tree_digest(str(module)) == hashlib.sha1(b"x = 2\n").hexdigest()


def test_unit_states():
    out = ("Id=celery-worker@io-threads.service\nActiveState=active\nUnitFileState=enabled\n\n"
           "Id=celery-worker@cpu-prefork.service\nActiveState=inactive\nUnitFileState=disabled\n")
    units = state.unit_states(out)
    assert units["celery-worker@io-threads.service"]["ActiveState"] == "active"
    assert units["celery-worker@cpu-prefork.service"]["UnitFileState"] == "disabled"


def test_packages_to_install():
    dpkg = ("rabbitmq-server ii  4.0.5-5+mirror1\nerlang-base ii  1:27.3.4.1+dfsg-1\n"
            "gpg rc  2.2.40-1.1\n")
    wanted = {"rabbitmq-server": "4.0.5-*+mirror1", "erlang-base": "1:27.*", "gpg": "", "python3-debian": ""}
    assert state.packages_to_install(dpkg, wanted) == ["gpg", "python3-debian"]  # removed, never installed
    assert state.packages_to_install(dpkg, {"rabbitmq-server": "4.1.*"}) == ["rabbitmq-server"]
