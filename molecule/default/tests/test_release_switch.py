"""Exact deploys: a host runs exactly the release it was last given, nothing of earlier ones.

Deploys two releases of the demo app (examples/demo_app, copied to the controller's temp dir)
with the workers' play (playbooks/celery_workers.yml, Flower skipped):
  A: the demo app plus one module (celery_stack_demo/release_probe.py) and one more dependency
     (inflection, a small pure-Python package from PyPI);
  B: the demo app plus another module, without both of A's additions.
After B the module must not import with the workers' venv python, the dependency must be gone
from that venv, the workers must run B's venv, and A must still be there for a rollback. Then a
file of the live release's venv is deleted: the next run must repair it and say so (changed).
Finally the inventory's own source is deployed again (its release was kept: a switch back), so
the scenario ends as it was (test_secrets' converge expects changed=0).
"""

import os
import re
import shutil
import time

import pytest
from playbook_runs import REPO, run

pytestmark = pytest.mark.skipif(
    not os.environ.get("MOLECULE_INVENTORY_FILE"), reason="needs the Molecule scenario's inventory"
)
testinfra_hosts = ["ansible://celery_workers"] if os.environ.get("MOLECULE_INVENTORY_FILE") else []

BASE = "/opt/celery-stack"
PYTHON = f"{BASE}/venv/bin/python"
DEMO = REPO / "examples" / "demo_app"
CHANGED_VALUES = REPO / "molecule" / "default" / "vars" / "changed_values.yml"
PROBE = "celery_stack_demo.release_probe"
DEPENDENCY = "inflection"


def _deploy(source):
    """The workers' play with the application from `source`; returns the recap's changed count."""
    started = time.monotonic()
    # The inventory as the side-effect step left it (rotated passwords): the workers' play does
    # not change the broker, so the workers must keep connecting with what it holds now.
    result, out = run("playbooks/celery_workers.yml",
                      {"celery_stack_app": {"source": str(source), "module": "celery_stack_demo.app"}},
                      options=["--skip-tags", "celery_flower", "-e", f"@{CHANGED_VALUES}"])
    assert result.returncode == 0, out[-6000:]
    changed = [int(n) for n in re.findall(r"^\S+\s+: ok=\d+\s+changed=(\d+)", out, re.M)]
    assert changed, out[-3000:]
    print(f"deployed {source.name}: changed={sum(changed)} in {time.monotonic() - started:.0f} s")
    return sum(changed)


def _copy_of_the_demo(tmp, name):
    """A copy of the demo app (under the same directory name: only its content differs)."""
    copy = tmp / name / "demo_app"
    shutil.copytree(DEMO, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    return copy


def _live(host):
    return host.check_output(f"readlink {BASE}/current").rsplit("/", 1)[-1]


def _worker_pids(host):
    units = host.check_output("systemctl list-units --plain --no-legend --state=active 'celery-worker@*'"
                              " | awk '{print $1}'").split()
    assert units, "no worker is active"
    return {unit: int(host.check_output("systemctl show -p MainPID --value %s", unit)) for unit in units}


def _assert_workers_run(host, release):
    """The interpreter of every worker's main process is the release's (the `celery` script's
    shebang, written when the release was built): a worker started before the switch is not."""
    for unit, pid in _worker_pids(host).items():
        argv = [a.decode() for a in host.file(f"/proc/{pid}/cmdline").content.split(b"\0") if a]
        assert re.fullmatch(rf"{BASE}/releases/{release}/venv/bin/python3?", argv[0]), (unit, argv)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("releases")
    a = _copy_of_the_demo(tmp, "a")
    (a / "src" / "celery_stack_demo" / "release_probe.py").write_text("RELEASE = 'A'\n")
    pyproject = a / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('dependencies = ["celery>=5.5,<6"]',
                                                       f'dependencies = ["celery>=5.5,<6", "{DEPENDENCY}==0.5.1"]'))
    assert DEPENDENCY in pyproject.read_text()
    b = _copy_of_the_demo(tmp, "b")
    (b / "src" / "celery_stack_demo" / "release_b.py").write_text("RELEASE = 'B'\n")
    yield {"a": a, "b": b}
    # Back to the inventory's own source, whatever happened above.
    _deploy(DEMO)


def test_a_new_release_leaves_nothing_of_the_previous_one(host, releases):
    _deploy(releases["a"])
    assert host.run(f"{PYTHON} -c 'import {PROBE}'").succeeded, "release A's module does not import"
    release_a = _live(host) if host.file(f"{BASE}/current").is_symlink else None

    assert _deploy(releases["b"]) > 0
    probe = host.run(f"{PYTHON} -c 'import {PROBE}; print({PROBE}.__file__)'")
    assert not probe.succeeded, f"module {PROBE} still importable after release B: {probe.stdout.strip()}"
    assert "ModuleNotFoundError" in probe.stderr, probe.stderr
    dependency = host.run(f"{PYTHON} -c 'import importlib.metadata as m; print(m.version(\"{DEPENDENCY}\"))'")
    assert not dependency.succeeded, f"{DEPENDENCY} {dependency.stdout.strip()} still in the venv after release B"
    assert host.run(f"{PYTHON} -c 'import celery_stack_demo.release_b'").succeeded

    # Every worker runs B's venv: the interpreter of its main process is the release's.
    release_b = _live(host)
    assert release_b != release_a
    _assert_workers_run(host, release_b)

    # A is kept for a rollback, complete and untouched.
    listing = host.check_output(f"{BASE}/bin/celery-stack-release list")
    assert re.search(rf"^  {release_a}  \S+ \S+  intact$", listing, re.M), listing
    assert re.search(rf"^\* {release_b}  \S+ \S+  intact$", listing, re.M), listing


def test_a_drifted_release_is_repaired(host, releases):
    release = _live(host)
    module = host.check_output(
        f"{PYTHON} -c 'import os, celery_stack_demo.tasks as t; print(os.path.realpath(t.__file__))'")
    assert module.startswith(f"{BASE}/releases/{release}/venv/"), module
    host.run_test(f"rm {module}")
    assert "DIFFERS FROM ITS DIGEST" in host.check_output(f"{BASE}/bin/celery-stack-release list")

    assert _deploy(releases["b"]) > 0, "a release with a deleted file was not repaired"
    assert _live(host) == release
    assert host.file(module).exists
    assert "DIFFERS" not in host.check_output(f"{BASE}/bin/celery-stack-release list")
    _assert_workers_run(host, release)
