"""`--check` reports what a real run would create and never fails on it.

A worker host where the inventory newly enables celery beat: its unit file does not exist yet,
and systemd cannot start (or even look up) a unit that is not written. The dry run must report
the unit file as a change and leave the start to the real run (it used to fail with "Could not
find the requested service celery-beat.service"). The host is put back as it was afterwards.
"""

import os
import re

import pytest
from playbook_runs import REPO, run

pytestmark = pytest.mark.skipif(
    not os.environ.get("MOLECULE_INVENTORY_FILE"), reason="needs the Molecule scenario's inventory"
)
testinfra_hosts = ["ansible://celery_workers"] if os.environ.get("MOLECULE_INVENTORY_FILE") else []

UNIT = "/etc/systemd/system/celery-beat.service"
ASIDE = "/root/celery-beat.service.aside"
CHANGED_VALUES = REPO / "molecule" / "default" / "vars" / "changed_values.yml"


def test_check_mode_on_a_host_that_newly_runs_beat(host):
    # The host as before beat was enabled on it: no unit file, systemd does not know the unit.
    host.run_test(f"systemctl disable --now celery-beat.service && mv {UNIT} {ASIDE} && systemctl daemon-reload")
    try:
        assert host.run("systemctl cat celery-beat.service").rc != 0
        result, out = run("playbooks/celery_workers.yml", options=[
            "--check", "--diff", "--skip-tags", "celery_flower", "-e", f"@{CHANGED_VALUES}"])
        assert result.returncode == 0, out[-6000:]
        assert re.search(r"changed: \[[^]]+\] => \(item=.*celery-beat\.service", out) or \
            re.search(rf"\+\+\+ after: {UNIT}", out), out[-6000:]
        # a dry run changes nothing
        assert not host.file(UNIT).exists
    finally:
        host.run_test(f"mv {ASIDE} {UNIT} && systemctl daemon-reload && systemctl enable --now celery-beat.service")
    assert host.service("celery-beat.service").is_running
