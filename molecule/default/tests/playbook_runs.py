"""Running the project's playbooks from the controller against the scenario's hosts, and what a
run refused in the preflight play looks like (shared by test_preflight.py and test_secrets.py)."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[3]
BIN = pathlib.Path(sys.executable).parent
PROVISIONING_PLAYS = ("Provision the RabbitMQ brokers", "Provision the Redis result store",
                      "Provision the Celery workers", "Provision the Celery producers")


def run(playbook, extra_vars=None, inventory=None, options=()):
    """ansible-playbook PLAYBOOK from the repository, no colours; returns (result, stdout+stderr).
    extra_vars: a dict (passed as JSON) or "@file"."""
    argv = [str(BIN / "ansible-playbook"), playbook, "-i", str(inventory or os.environ["MOLECULE_INVENTORY_FILE"]),
            *options]
    if extra_vars:
        argv += ["-e", extra_vars if isinstance(extra_vars, str) else json.dumps(extra_vars)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False,
                            env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"})
    return result, result.stdout + result.stderr


def assert_refused_in_preflight(result, out, expected):
    assert result.returncode != 0, out
    assert "PLAY [Validate the inventory before any host is changed]" in out, out
    # Extra vars are never echoed and no task name holds a variable name: the text comes from
    # the failure message (on stderr under Molecule, on stdout otherwise).
    assert expected in out, out
    assert "Traceback" not in out and "TemplateSyntaxError" not in out, out
    for play in PROVISIONING_PLAYS:
        assert f"PLAY [{play}]" not in out, f"{play} started despite invalid input"
