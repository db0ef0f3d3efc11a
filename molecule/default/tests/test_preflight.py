"""Bad input fails the run before any host is changed, with a message naming the variable.

Runs site.yml from the controller against this scenario's hosts with one wrong inventory value
each time, and checks that the run failed in the preflight play (which validates every role's
input on every host) and that no provisioning play started. Also: a change of the routed
queues' type, which only the running broker can reveal, stops the run in the broker play,
before any worker is touched.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
PLAYBOOK = pathlib.Path(sys.executable).parent / "ansible-playbook"

pytestmark = pytest.mark.skipif(
    not os.environ.get("MOLECULE_INVENTORY_FILE"), reason="needs the Molecule scenario's inventory"
)

CASES = {
    # a typo in the routing table: a pool that does not exist
    "celery_stack_queues": {
        "celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "pools": {"prefrok": {"concurrency": 2}}}]
    },
    # an Erlang version pattern without its epoch "1:" (matches no package)
    "rabbitmq_erlang_version": {"rabbitmq_erlang_version": "27.*"},
    # a memory policy that silently drops a Redis broker's messages
    "redis_maxmemory_policy": {"redis_maxmemory_policy": "allkeys-lru"},
}


def _site(extra_vars):
    run = subprocess.run(
        [str(PLAYBOOK), "site.yml", "-i", os.environ["MOLECULE_INVENTORY_FILE"],
         "-e", json.dumps(extra_vars)],
        cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"},
    )
    return run, run.stdout + run.stderr


@pytest.mark.parametrize("variable", sorted(CASES))
def test_bad_input_fails_before_any_host_is_changed(variable):
    run, out = _site(CASES[variable])
    assert run.returncode != 0, out
    assert "PLAY [Validate the inventory before any host is changed]" in out, out
    # Extra vars are never echoed and no task name holds a variable name: the name comes from
    # the failure message (on stderr under Molecule, on stdout otherwise).
    assert variable in out, out
    for play in ("Provision the RabbitMQ brokers", "Provision the Redis result store",
                 "Provision the Celery workers"):
        assert f"PLAY [{play}]" not in out, f"{play} started despite invalid input"


def test_queue_type_change_stops_the_run_before_the_workers():
    """One broker: the routed queues exist as classic queues. Asking for quorum queues must stop
    the broker play, naming the queue and the setting, before users or workers are touched."""
    run, out = _site({"celery_stack_quorum_queues": True})
    assert run.returncode != 0, out
    assert "exists as a classic queue" in out and "celery_stack_quorum_queues" in out, out
    assert "PLAY [Provision the Celery workers]" not in out
    assert "Create the users and set their passwords" not in out
