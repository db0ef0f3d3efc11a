"""Unit tests of the health check's decisions (files/opt/celery-stack/bin/celery-stack-health):
which instance is restarted, and when. Its pings and restarts run for real in the cluster
scenario (molecule/cluster/tests/test_health.py). Run by `make test` (test.sh unit)."""

import importlib.machinery
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "files/opt/celery-stack/bin/celery-stack-health"
loader = importlib.machinery.SourceFileLoader("celery_stack_health", str(SCRIPT))
health = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
loader.exec_module(health)

SHOW = """Id=celery-worker@io-prefork.service
ActiveState=active
ActiveEnterTimestampMonotonic=1000000

Id=celery-worker@io-threads.service
ActiveState=activating
ActiveEnterTimestampMonotonic=0

Id=celery-worker@cpu-prefork.service
ActiveState=active
ActiveEnterTimestampMonotonic=95000000
"""


def test_unit_ages_of_the_active_instances():
    assert health.parse_unit_ages(SHOW, 100_000_000) == {"io-prefork": 99.0, "cpu-prefork": 5.0}


def test_an_instance_is_restarted_after_the_given_misses_in_a_row():
    ages = {"io-prefork": 300, "io-threads": 300}
    counts, restart = health.verdicts(ages, {"io-prefork"}, {}, failures=3, grace=60)
    assert (counts, restart) == ({"io-threads": 1}, [])
    counts, restart = health.verdicts(ages, {"io-prefork"}, counts, failures=3, grace=60)
    assert (counts, restart) == ({"io-threads": 2}, [])
    counts, restart = health.verdicts(ages, {"io-prefork"}, counts, failures=3, grace=60)
    assert (counts, restart) == ({}, ["io-threads"])


def test_an_answer_resets_the_count():
    counts, restart = health.verdicts({"io-threads": 300}, {"io-threads"}, {"io-threads": 2}, 3, 60)
    assert (counts, restart) == ({}, [])


def test_no_verdict_on_an_instance_still_starting():
    counts, restart = health.verdicts({"io-threads": 10}, set(), {"io-threads": 2}, 3, 60)
    assert (counts, restart) == ({}, [])


def test_a_busy_instance_that_misses_pings_is_never_restarted():
    ages = {"io-threads": 300}
    counts = {}
    for _ in range(5):
        counts, restart = health.verdicts(ages, set(), counts, failures=2, grace=60, working={"io-threads"})
        assert (counts, restart) == ({}, [])


def test_progress_counts_only_for_the_same_process_with_more_tasks_completed(tmp_path):
    for name, data in {"io-threads": '{"pid": 7, "completed": 120}', "io-prefork": '{"pid": 8, "completed": 5}',
                       "cpu-prefork": "half a fi"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "progress.json").write_text(data)
    progress = health.read_progress(["io-threads", "io-prefork", "cpu-prefork", "cpu-threads"],
                                    str(tmp_path / "{}" / "progress.json"))
    assert progress == {"io-threads": [7, 120], "io-prefork": [8, 5]}
    previous = {"io-threads": [7, 100], "io-prefork": [6, 1]}
    # io-prefork was restarted (another pid): its count says nothing about this process
    assert health.busy(progress, previous) == {"io-threads"}
    assert health.busy(progress, {"io-threads": [7, 120]}) == set()
