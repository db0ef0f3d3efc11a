"""What the scenarios' testinfra modules share: the Molecule inventory's hosts and the
deployment's venv python. A test module of any scenario (molecule/<scenario>/tests) imports it
after putting this directory on sys.path:

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "tests"))
    from stack_hosts import VENV_PYTHON, group_hosts, inventory_host  # noqa: E402

Outside Molecule (MOLECULE_INVENTORY_FILE unset: collection only, or a run against the local
stack with --hosts) the groups are empty, so the modules still import.
"""

import os
import time

import testinfra
import testinfra.utils.ansible_runner

# The scenario's inventory, as Molecule hands it to the verifier.
INVENTORY = os.environ.get("MOLECULE_INVENTORY_FILE")
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY) if INVENTORY else None
# The deployment's venv (celery_app role, celery_app_base_dir /opt/celery-stack).
VENV_PYTHON = "/opt/celery-stack/venv/bin/python"
# The deployment's CA bundle, on every host when celery_stack_tls is on (roles/tls, tls_dir).
TLS_CA = "/etc/celery-stack/tls/ca.crt"


def group_hosts(group):
    """The inventory hosts of a group (none outside Molecule)."""
    return RUNNER.get_hosts(group) if RUNNER else []


def inventory_host(name):
    """The testinfra host of an inventory host, reached through the scenario's inventory."""
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


def poll(check, timeout, interval=1.0):
    """check() until it returns something true or the timeout passes; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
