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


# --- --metrics: the restarts as a Prometheus textfile (celery_stack_exporters) -------------------

def test_restart_counters_start_at_zero_and_follow_the_watched_instances():
    assert health.count_restarts({}, [], ["io-threads", "io-prefork"]) == {"io-prefork": 0, "io-threads": 0}
    restarts = health.count_restarts({"io-threads": 2, "gone-prefork": 5}, ["io-threads"], ["io-threads", "cpu-prefork"])
    assert restarts == {"cpu-prefork": 0, "io-threads": 3}


def test_the_metrics_text_names_every_unit_and_the_run():
    text = health.metrics_text({"io-threads": 3, "cpu-prefork": 0}, 1700000000.25)
    assert "# TYPE celery_stack_health_restarts_total counter\n" in text
    assert 'celery_stack_health_restarts_total{unit="celery-worker@io-threads.service"} 3\n' in text
    assert 'celery_stack_health_restarts_total{unit="celery-worker@cpu-prefork.service"} 0\n' in text
    assert text.endswith("celery_stack_health_last_run_timestamp_seconds 1700000000.250\n")


def test_the_metrics_file_is_replaced_whole_and_world_readable(tmp_path):
    target = tmp_path / "celery-stack-health.prom"
    target.write_text("old")
    assert health.write_metrics(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["celery-stack-health.prom"]  # no temporary file left


def test_a_metrics_directory_that_cannot_be_written_is_no_failure(tmp_path, capsys):
    assert not health.write_metrics(str(tmp_path / "missing" / "x.prom"), "text\n")
    assert "metrics not written" in capsys.readouterr().out


def _run(tmp_path, monkeypatch, answered, ages=None):
    """One run of main() with systemd and the broker replaced: `answered` (None: broker down)."""
    workers = tmp_path / "workers.json"
    workers.write_text('[{"instance": "io-threads"}, {"instance": "io-prefork"}]')
    monkeypatch.setattr(health, "unit_ages", lambda names: dict(ages if ages is not None else
                                                                {n: 300 for n in names}))
    monkeypatch.setattr(health, "ping", lambda names, host, timeout: answered)
    monkeypatch.setattr(health, "read_progress", lambda names: {})
    restarted = []
    monkeypatch.setattr(health.subprocess, "run", lambda argv, check: restarted.append(argv[-1]))
    metrics = tmp_path / "health.prom"
    assert health.main(["--workers", str(workers), "--state", str(tmp_path / "state.json"), "--failures", "2",
                        "--metrics", str(metrics)]) == 0
    return restarted, metrics.read_text()


def test_the_counter_goes_up_with_each_restart_and_survives_the_runs_between(tmp_path, monkeypatch):
    io_threads = 'celery_stack_health_restarts_total{unit="celery-worker@io-threads.service"}'
    io_prefork = 'celery_stack_health_restarts_total{unit="celery-worker@io-prefork.service"}'
    restarted, text = _run(tmp_path, monkeypatch, {"io-prefork"})
    assert restarted == [] and f"{io_threads} 0\n" in text and f"{io_prefork} 0\n" in text
    restarted, text = _run(tmp_path, monkeypatch, {"io-prefork"})
    assert restarted == ["celery-worker@io-threads.service"] and f"{io_threads} 1\n" in text
    # runs without a verdict (broker unreachable, no active instance) still write the metrics
    restarted, text = _run(tmp_path, monkeypatch, None)
    assert restarted == [] and f"{io_threads} 1\n" in text
    restarted, text = _run(tmp_path, monkeypatch, set(), ages={})
    assert f"{io_threads} 1\n" in text and "celery_stack_health_last_run_timestamp_seconds" in text
    _run(tmp_path, monkeypatch, {"io-prefork"})
    restarted, text = _run(tmp_path, monkeypatch, {"io-prefork"})
    assert f"{io_threads} 2\n" in text and f"{io_prefork} 0\n" in text


def test_without_metrics_no_file_is_written(tmp_path, monkeypatch):
    workers = tmp_path / "workers.json"
    workers.write_text('[{"instance": "io-threads"}]')
    monkeypatch.setattr(health, "unit_ages", lambda names: {})
    assert health.main(["--workers", str(workers), "--state", str(tmp_path / "state.json")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "workers.json"]
