"""No secret in any output, and none in a world-readable file on any host.

The secrets are the values of every inventory variable named like a password, secret or cookie
(inventories/local/group_vars, which the scenario converges with, and the values the side-effect
step rotated them to: vars/changed_values.yml). Three ways they could leak:
- a converge at -vvv (every task's arguments, loop items, results and connection commands);
- the preflight play refusing bad input at -vvv, one case per check that looks at secret-bearing
  values (its message must still name what to fix);
- a file any local user can read, on any host of the scenario.
"""

import os
import re
import shlex

import pytest
import yaml
from playbook_runs import REPO, assert_refused_in_preflight, run

pytestmark = pytest.mark.skipif(
    not os.environ.get("MOLECULE_INVENTORY_FILE"), reason="needs the Molecule scenario's inventory"
)

CHANGED_VALUES = REPO / "molecule" / "default" / "vars" / "changed_values.yml"
SECRET_NAMES = ("password", "secret", "cookie")


def _secret_values(node, name=""):
    """The literal values of variables (at any depth) whose name says they are secret."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _secret_values(value, f"{name}.{key}")
    elif isinstance(node, list):
        for value in node:
            yield from _secret_values(value, name)
    elif isinstance(node, str) and "{{" not in node and any(word in name.lower() for word in SECRET_NAMES):
        yield node


def _inventory_secrets():
    files = sorted((REPO / "inventories" / "local" / "group_vars").rglob("*.yml")) + [CHANGED_VALUES]
    values = {value for path in files for value in _secret_values(yaml.safe_load(path.read_text()) or {})}
    assert len(values) >= 8, f"too few secrets found to make this test meaningful: {len(values)}"
    return sorted(values)


SECRETS = _inventory_secrets()


def _leaked(out, extra=()):
    return [secret for secret in (*SECRETS, *extra) if secret in out]


def test_a_converge_at_vvv_shows_no_secret():
    """The stack as the side-effect step left it, converged again at -vvv: nothing changes, and
    no secret appears anywhere in the output."""
    result, out = run("site.yml", f"@{CHANGED_VALUES}", options=["-vvv"])
    assert result.returncode == 0, out[-5000:]
    assert "ESTABLISH" in out, "not a -vvv run"
    recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", out, re.M)
    assert recap and all(changed == "0" for _, changed in recap), recap
    assert _leaked(out) == []


# inventory values -> a text the refusal must contain. Each breaks one check that looks at
# secret-bearing values; every password-like value given here must not appear in the output.
CASES = {
    "a Redis ACL user with an unknown preset": (
        {"redis_users": [{"name": "app-cache", "password": "Zq9-acl-preset-secret-0001", "preset": "cache"}]},
        "redis_users[0] (app-cache).preset 'cache'"),
    "a Redis ACL user with a short password": (
        {"redis_users": [{"name": "app-cache", "password": "Zq9-acl-short", "preset": "celery_result_backend",
                          "keys": ["app-cache-*"]}]},
        "redis_users[0] (app-cache).password is shorter than 16"),
    "a RabbitMQ user with a bad tag": (
        {"rabbitmq_users": [{"name": "ops-admin", "password": "Zq9-admin-secret", "tags": ["admin istrator"]}]},
        "rabbitmq_users[0] (ops-admin).tags: 'admin istrator' is not a RabbitMQ user tag"),
    "a RabbitMQ user with a short password": (
        {"rabbitmq_users": [{"name": "ops-admin", "password": "Zq9-adm", "tags": ["administrator"]}]},
        "rabbitmq_users[0] (ops-admin).password is shorter than 8"),
    "a short result-store password": (
        {"celery_stack_redis_results_password": "Zq9-results"},
        "celery_stack_redis_results_password is shorter than 16"),
    "a password that is not a string": (
        {"celery_stack_broker_password": {"value": "Zq9-mapping-secret"}},
        "celery_stack_broker_password"),
    "a password with a line break": (
        {"celery_stack_redis_results_password": "Zq9-results-secret\nsecond-line"},
        "celery_stack_redis_results_password contains a line break"),
    # a failing argument spec prints the task it validated: the secrets it was given must not be
    "a role setting the spec refuses": (
        {"redis_appendfsync": "sometimes", "redis_users": [
            {"name": "app-cache", "password": "Zq9-acl-spec-secret-0001", "preset": "celery_result_backend"}]},
        "redis_appendfsync must be one of"),
}


def _given_passwords(node):
    return [value for value in _secret_values(node) if value.startswith("Zq9-")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_refused_secret_is_not_shown(case):
    extra_vars, expected = CASES[case]
    given = _given_passwords(extra_vars)
    assert given, "a case must give the password it checks"
    result, out = run("site.yml", extra_vars, options=["-vvv"])
    assert_refused_in_preflight(result, out, expected)
    assert _leaked(out, given) == []


testinfra_hosts = ["ansible://all"] if os.environ.get("MOLECULE_INVENTORY_FILE") else []

# Trees that hold only what packages installed, or no files at all.
NOT_SEARCHED = ("/proc", "/sys", "/dev", "/usr", "/var/lib/apt", "/var/cache/apt", "/var/lib/dpkg")


def test_no_world_readable_file_holds_a_secret(host):
    prune = " -o ".join(f"-path {path}" for path in NOT_SEARCHED)
    patterns = " ".join(f"-e {shlex.quote(secret)}" for secret in SECRETS)
    found = host.run(
        f"find / -xdev \\( {prune} \\) -prune -o -type f -perm -0004 -size -20M -print0"
        f" | xargs -0 -r grep -lF {patterns}")
    # grep exits 1 when a batch has no match, so xargs 123: the list of files is what counts
    assert found.rc in (0, 1, 123) and found.stderr == "", found.stderr
    assert found.stdout.split() == [], "world-readable files with a secret: " + found.stdout
