"""The action celery_stack.core.files (plugins/action/files.py) against a real host.

One scratch set of two directories and three files on the worker host: written from nothing,
then nothing to do (changed=0), then only the mode of one file changes (the host gets the new
mode and nothing else is written), then its content (the diff shows it); a dry run writes
nothing; the file marked secret never shows its content, even at -vvv with --diff and a change.
The comparison itself is unit-tested (tests/unit/plugins/module_utils/test_managed_files.py).
"""

import json
import os
import re

import pytest
from playbook_runs import run

pytestmark = pytest.mark.skipif(
    not os.environ.get("MOLECULE_INVENTORY_FILE"), reason="needs the Molecule scenario's inventory"
)
testinfra_hosts = ["ansible://celery_workers"] if os.environ.get("MOLECULE_INVENTORY_FILE") else []

PLAYBOOK = "molecule/default/tests/playbooks/files_action.yml"
ROOT = "/var/tmp/celery-stack-files-probe"


def test_files_are_written_only_where_they_differ(host, tmp_path):
    report = tmp_path / "report.json"

    def _probe(extra_vars=None, options=()):
        result, out = run(PLAYBOOK, {**(extra_vars or {}), "probe_report": str(report)}, options=list(options))
        assert result.returncode == 0, out[-4000:]
        return json.loads(report.read_text()), out

    host.run(f"rm -rf {ROOT}")
    try:
        dry, _ = _probe(options=["--check"])
        assert [p["path"] for p in dry["paths"]] == [ROOT, f"{ROOT}/private", f"{ROOT}/a.conf",
                                                    f"{ROOT}/private/secret.env", f"{ROOT}/b.conf"]
        assert not host.file(ROOT).exists, "a dry run wrote"

        first, _ = _probe()
        assert first["restarts"] == ["workers", "beat"]
        assert host.file(f"{ROOT}/private").group == "daemon" and host.file(f"{ROOT}/private").mode == 0o750
        assert host.file(f"{ROOT}/private/secret.env").mode == 0o640

        again, _ = _probe()
        assert again == {"restarts": [], "paths": []}

        # only the mode of a.conf changes: the host gets it, nothing else is written
        mode, _ = _probe({"probe_mode": "0600"})
        assert mode["paths"] == [{"path": f"{ROOT}/a.conf", "reasons": ["mode"]}]
        assert host.file(f"{ROOT}/a.conf").mode == 0o600

        content, out = _probe({"probe_mode": "0600", "probe_value": "2"}, options=["--diff"])
        assert content["paths"] == [{"path": f"{ROOT}/a.conf", "reasons": ["content"]}]
        assert re.search(r"^\+a=2$", out, re.M), out[-3000:]

        secret, out = _probe({"probe_mode": "0600", "probe_value": "2", "probe_secret": "Zq9-files-probe-rotated"},
                             options=["--diff", "-vvv"])
        assert secret["paths"] == [{"path": f"{ROOT}/private/secret.env", "reasons": ["content"]}]
        assert "Zq9-files-probe" not in out
        assert host.file(f"{ROOT}/private/secret.env").contains("Zq9-files-probe-rotated")
    finally:
        host.run(f"rm -rf {ROOT}")
