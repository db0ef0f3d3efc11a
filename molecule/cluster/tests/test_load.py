"""The load suite, reduced for CI: its key rows (2,000 and 10,000 instant tasks to io on the
threads workers at concurrency 32, monitoring on, as this scenario's inventory has it) and a
small I/O-wait row, on the health check of the inventory (10 s, 2 failures). Nothing stuck,
nothing lost, no restart of a busy worker by the health check or anything else. Before the
events connection went without publisher confirms, the threads worker deadlocked in the
10,000 row in 2 runs of 2 on the local stack (208 and 1,290 completed); the 2,000 row alone
passed there in 2 of 2 (the deadlock is a race).

load.py converges the workers to the rows' configuration (io on threads alone at concurrency
32, cpu on prefork alone) and back to the inventory's: about two minutes in all.
The suite drives every host with docker from the controller, so it runs once, not per host.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[3]
IOWAIT_TASKS = int(os.environ.get("CELERY_STACK_LOAD_IOWAIT_TASKS", "500"))

testinfra_hosts = None


def test_a_burst_neither_strands_a_task_nor_restarts_a_busy_worker(tmp_path):
    rows_file = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "molecule" / "shared" / "faults" / "load.py"),
         "-i", os.environ["MOLECULE_INVENTORY_FILE"], "--only", "instant-2k,instant-10k,iowait",
         "--tasks", f"iowait={IOWAIT_TASKS}", "--monitoring", "on", "--health", "inventory",
         "--soak-seconds", "0", "--patience", "60", "--json", str(rows_file)],
        cwd=REPO, capture_output=True, text=True, check=False)
    print(run.stdout)
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else []
    assert [row["row"] for row in rows] == ["instant-2k", "instant-10k", "iowait"], run.stdout + run.stderr
    for row in rows:
        assert row["config"].startswith("mon on"), row
        assert (row["stuck"], row["lost"], row["hc_restarts"], row["restarts"]) == (0, 0, 0, 0), row
        sizes = {"instant-2k": 2000, "instant-10k": 10000, "iowait": IOWAIT_TASKS}
        assert row["completed"] == row["sent"] == sizes[row["row"]], row
    assert run.returncode == 0, run.stdout + run.stderr
