"""The ssh scenario's deployment really went the way of real hosts: over SSH as the unprivileged
user deploy, root through sudo, modules copied to temporary files (pipelining off), and a host
without the acl package. The stack's own behaviour is checked by the default scenario's tests,
the ones that depend on the Debian release run here too (molecule.yml).

The evidence is the host's own journal: sshd logs each login, sudo each command it runs for
deploy. A module sent through the session (pipelining) shows as a bare `python3`; copied to a
temporary file first, as `python3 /home/deploy/.ansible/tmp/ansible-tmp-.../AnsiballZ_<module>.py`.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

# The default scenario's helpers for running the project's playbooks (its tests run here too).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "default" / "tests"))
from playbook_runs import assert_refused_in_preflight, run  # noqa: E402

testinfra_hosts = ["ansible://celery_workers"] if os.environ.get("MOLECULE_INVENTORY_FILE") else []
BIN = pathlib.Path(sys.executable).parent
DEPLOY = "deploy"
# A sudo log line of a module ansible ran as root for deploy (sudo logs the whole command).
SUDO_MODULE = re.compile(rf"{DEPLOY} : .*USER=root ; COMMAND=/bin/sh -c '?echo BECOME-SUCCESS-\w+ ; (?P<run>.*?)'?$")


def _journal(host, *args):
    return host.check_output("journalctl --no-pager -o cat " + " ".join(args))


def test_deploy_logged_in_with_its_key(host):
    assert f"Accepted publickey for {DEPLOY} from" in _journal(host, "-u", "ssh.service")


def test_every_module_run_as_root_was_a_temporary_file_of_deploy(host):
    """Every module the runs (prepare, converge, idempotence) became root for through sudo was
    first copied into deploy's temporary directory: pipelining was off."""
    runs = [m.group("run") for m in map(SUDO_MODULE.search, _journal(host, "-t", "sudo").splitlines()) if m]
    modules = {re.search(r"AnsiballZ_(\w+)\.py", run).group(1) for run in runs if "AnsiballZ_" in run}
    piped = [run for run in runs if "AnsiballZ_" not in run]
    assert piped == [], f"modules sent through the session (pipelining on): {piped[:3]}"
    # The roles' modules among them: the run did converge the stack this way.
    assert {"apt", "deb822_repository", "copy", "command", "systemd_service", "rabbitmq_user"} <= modules, sorted(modules)
    assert all(f"/home/{DEPLOY}/.ansible/tmp/ansible-tmp-" in run for run in runs), runs[:3]


def test_a_task_without_become_runs_as_deploy(host):
    """A task that does not become (the preflight play gathers facts that way) runs as deploy,
    over ssh, with the module copied to the host first."""
    name = host.ansible.get_variables()["inventory_hostname"]
    env = {**os.environ, "ANSIBLE_BECOME": "False", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run(
        [str(BIN / "ansible"), name, "-i", os.environ["MOLECULE_INVENTORY_FILE"], "-m", "ansible.builtin.setup",
         "-a", "filter=ansible_user_id", "-e", "ansible_become=false", "-vvv"],
        capture_output=True, text=True, check=False, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"ESTABLISH SSH CONNECTION FOR USER: {DEPLOY}" in out, out
    assert re.search(rf"PUT \S+ TO /home/{DEPLOY}/\.ansible/tmp/\S+/AnsiballZ_setup\.py", out), out
    assert f'"ansible_user_id": "{DEPLOY}"' in out, out


def test_the_host_has_no_acl(host):
    """Without acl, Ansible cannot hand a temporary file to an unprivileged user it becomes:
    the roles must not need to (they run such commands as root through runuser)."""
    assert not host.package("acl").is_installed
    assert not host.exists("setfacl")


@pytest.mark.parametrize("method", ["su", "community.general.doas"])
def test_a_become_method_other_than_sudo_is_refused(method, monkeypatch):
    """Only sudo is tested (this scenario): another become method, set for the hosts, is refused
    in the preflight play, naming the variable."""
    # The facts are gathered without become, as in a real run (testinfra's ANSIBLE_BECOME off).
    monkeypatch.setenv("ANSIBLE_BECOME", "False")
    assert_refused_in_preflight(*run("site.yml", {"ansible_become_method": method}),
                                f"ansible_become_method is '{method}'")


@pytest.mark.parametrize("user", ["celery"])
def test_the_load_check_ran_as_the_app_user(host, user):
    """The role checks that the application loads as its own user, through runuser as root."""
    assert f"pam_unix(runuser:session): session opened for user {user}" in _journal(host, "-t", "runuser")
