"""The alert rules as the role renders them (templates/etc/prometheus/rules/celery-stack.rules.yml.j2,
with its default thresholds), against promtool's tests next to this file. Run by `make test`
(molecule/shared/test.sh unit), which finds promtool on PATH or in .cache (bootstrap.sh puts
Debian's there).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import yaml

ROLE = Path(__file__).resolve().parents[1]
ROOT = ROLE.parents[1]
sys.path.insert(0, str(ROOT / "collections"))

from ansible_collections.celery_stack.core.plugins.filter.monitoring import queue_matchers  # noqa: E402

TEMPLATE = "etc/prometheus/rules/celery-stack.rules.yml.j2"
# The test series' routing table: what vars/main.yml derives from celery_stack_queues.
ROUTED = [{"name": "io"}, {"name": "cpu"}]


def promtool():
    found = shutil.which("promtool") or str(ROOT / ".cache/promtool/usr/bin/promtool")
    assert os.access(found, os.X_OK), "promtool is missing: run molecule/shared/bootstrap.sh"
    return found


def render(**overrides):
    """The rules file as the role writes it: the template with the role's defaults, [[ ]] as its
    markers (as tasks/files.yml renders it)."""
    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROLE / "templates"), undefined=jinja2.StrictUndefined,
                             variable_start_string="[[", variable_end_string="]]", keep_trailing_newline=True)
    values = dict(defaults, ansible_managed="Ansible managed", celery_monitoring__vhost="celery",
                  celery_monitoring__queues=queue_matchers(ROUTED))
    values.update(overrides)
    return env.get_template(TEMPLATE).render(values)


def test_the_thresholds_are_plain_values():
    """The render above reads defaults/main.yml as YAML: a default that is a template would land in
    the rules unrendered."""
    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    templated = {k for k, v in defaults.items() if "{{" in str(v)}
    assert templated == {"celery_monitoring_container_compat"}
    assert not templated & set((ROLE / "templates" / TEMPLATE).read_text().split())


def test_every_rule_fires_and_stays_quiet_as_its_tests_say(tmp_path):
    (tmp_path / "celery-stack.rules.yml").write_text(render())
    shutil.copy(Path(__file__).with_name("celery-stack.rules.test.yml"), tmp_path)
    done = subprocess.run([promtool(), "test", "rules", "celery-stack.rules.test.yml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rule_has_a_test():
    rules = yaml.safe_load(render())["groups"][0]["rules"]
    tests = yaml.safe_load(Path(__file__).with_name("celery-stack.rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert {r["alert"] for r in rules} - tested == set()


def test_promtool_checks_the_rules(tmp_path):
    path = tmp_path / "celery-stack.rules.yml"
    path.write_text(render(celery_monitoring_queue_without_consumer_for="90s"))
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
