"""The feature suite's client (features.py): runs on a producer host, as the web app's account,
with the deployment's own app and settings (celery_stack_app), and tries Celery's canvas, control
and result features through the deployed stack, one row at a time. One JSON line per row on
stdout: {"row", "status", "detail", "seconds"}; status is

  ok         the feature works through the deployment;
  by design  refused or limited on purpose (docs/producers-and-django.md says why): the reason is the detail;
  n/a        the row exercises another backend's code path;
  FAIL       anything else, with the error.

  features_client.py '{"rows": [...], "sizes": {...}, "queue": "cpu"}'

"queue": a routed queue with a worker of each pool (revoke of a running task: prefork can
terminate it, threads cannot).
"""

import json
import sys
import time
import uuid
from types import SimpleNamespace

from celery import chord, chunks, group, xmap, xstarmap
from celery.exceptions import ChordError
from celery.result import AsyncResult, GroupResult
from celery_stack_app import app

ARGS = json.loads(sys.argv[1])
SIZES = {"group": 200, "chord": 20, "chord_large": 1000, "priority_backlog": 200, **ARGS.get("sizes", {})}
TIMEOUT = 180
TASKS = "celery_stack_demo.features."
BACKEND = app.conf.result_backend.split(":", 1)[0]  # redis, rpc, ...
BROKER = app.conf.broker_url.split(":", 1)[0]  # amqp, redis

# The rpc backend keeps a result only in the reply queue of the process that sent the task: no
# result store, so Celery refuses chords (NotImplementedError) and saved groups.
RPC_NO_STORE = "the rpc backend has no result store: Celery refuses chords and saved groups (use Redis results)"
BY_DESIGN = {
    **{(row, "rpc"): RPC_NO_STORE for row in (
        "chord", "chord-large", "chord-in-chain", "chord-failing-header", "add-to-chord", "group-save-restore")},
}
REDIS_BACKEND_PATH = "a code path of the Redis result backend"


class ByDesign(Exception):
    """Refused or limited on purpose: the message says why."""


class NotApplicable(Exception):
    pass


def sig(name, *args, **options):
    return app.signature(TASKS + name, args=args, **options)


def expect(value, wanted, what="result"):
    if value != wanted:
        raise AssertionError(f"{what} {value!r}, expected {wanted!r}")


def final_state(result, timeout=60):
    """The state a task ended in. Waiting with get() rather than polling .state: the rpc backend
    delivers states to the sender's reply queue, which only get() drains."""
    result.get(timeout=timeout, propagate=False)
    return result.state


# -- canvas -------------------------------------------------------------------------------------
def row_chain():
    expect((sig("add", 1, 2) | sig("add", 3) | sig("add", 4)).apply_async().get(timeout=TIMEOUT), 10)
    return "add(1, 2) | add(3) | add(4) = 10"


def row_group():
    n = SIZES["group"]
    expect(group(sig("add", i, i) for i in range(n)).apply_async().get(timeout=TIMEOUT), [2 * i for i in range(n)])
    return f"{n} tasks, results in order"


def _chord(n):
    expect(chord([sig("add", i, i) for i in range(n)], sig("tsum")).apply_async().get(timeout=TIMEOUT), n * (n - 1))
    return f"{n} header tasks, body = {n * (n - 1)}"


def row_chord():
    return _chord(SIZES["chord"])


def row_chord_large():
    return _chord(SIZES["chord_large"])


def row_chord_in_chain():
    flow = sig("add", 1, 1) | chord([sig("add", i) for i in range(3)], sig("tsum")) | sig("add", 100)
    expect(flow.apply_async().get(timeout=TIMEOUT), 109)
    return "add(1, 1) | chord(add(2, i) for i < 3, tsum) | add(100) = 109"


def row_chord_failing_header():
    result = chord([sig("add", 1, 1), sig("fail")], sig("tsum")).apply_async()
    try:
        value = result.get(timeout=TIMEOUT)
    except (ChordError, ValueError) as error:  # Celery raises the header's own error where it can
        if "failed on purpose" not in str(error):
            raise
        return f"the body did not run; get() raised {type(error).__name__}: {error}"[:100]
    raise AssertionError(f"the body ran despite a failed header task: {value!r}")


def row_add_to_chord():
    expect(chord([sig("grow_chord", 5), sig("add", 1, 1)], sig("tsum")).apply_async().get(timeout=TIMEOUT), 17)
    return "grow_chord(5) added add(5, 5): body = 5 + 2 + 10 = 17"


def _redis_backend():
    if BACKEND not in ("redis", "rediss"):
        raise NotApplicable(REDIS_BACKEND_PATH)
    return app.backend


def row_chord_unordered():
    """result_chord_ordered false is a setting of the workers (whose backend records the chord's
    parts): here Celery's own backend code, with that setting and the results ACL user of every
    host, records the parts of a chord as a worker would; its body is sent through the stack."""
    _redis_backend()
    saved = app.conf.result_backend_transport_options
    app.conf.result_backend_transport_options = {**(saved or {}), "result_chord_ordered": False}
    try:
        backend = type(app.backend)(app=app, url=app.conf.result_backend)
        expect(backend._chord_zset, False, "result_chord_ordered")
        group_id, body, n = str(uuid.uuid4()), sig("tsum"), 5
        body_id = body.freeze().id
        backend.set_chord_size(group_id, n)
        for index in range(n):
            request = SimpleNamespace(id=str(uuid.uuid4()), group=group_id, group_index=index, chord=dict(body))
            backend.on_chord_part_return(request, "SUCCESS", index * 10)
    finally:
        app.conf.result_backend_transport_options = saved
    expect(AsyncResult(body_id, app=app).get(timeout=TIMEOUT), 100)
    return f"{n} parts kept in a list (RPUSH, LLEN, LRANGE), body = 100"


def row_chord_claim_expired():
    """The dispatch claim of a chord that expired while the claiming worker joined the results is
    taken again (Celery's CHORD_CLAIM_EXTEND_LUA: GET, EXISTS, SET NX), then released."""
    backend = _redis_backend()
    group_id, token = str(uuid.uuid4()), uuid.uuid4().hex
    keys = {part: backend.get_key_for_group(group_id, f".{part}") for part in "cjtsd"}
    backend.set_chord_size(group_id, 1)
    taken = backend._chord_claim_extend_script(keys=[keys["c"], keys["s"]], args=[token, 10], client=backend.client)
    expect(taken, 1, "re-claim")
    released = backend._chord_cleanup_script(keys=[keys[p] for p in "cjtsd"], args=[token, 300], client=backend.client)
    expect(released, 1, "release")
    return "an expired claim taken again while the chord's size key exists, then released"


def row_chunks():
    items = [(i, i) for i in range(100)]
    value = chunks(sig("add"), items, 10).group().apply_async().get(timeout=TIMEOUT)
    expect(value, [[2 * i for i in range(k, k + 10)] for k in range(0, 100, 10)])
    return "100 items in 10 chunks"


def row_starmap():
    expect(xstarmap(sig("add"), [(i, i) for i in range(20)]).apply_async().get(timeout=TIMEOUT),
           [2 * i for i in range(20)])
    return "add over 20 pairs in one task"


def row_map():
    expect(xmap(sig("tsum"), [[1, 2], [3, 4]]).apply_async().get(timeout=TIMEOUT), [3, 7])
    return "tsum over 2 lists in one task"


# -- results ------------------------------------------------------------------------------------
def row_group_save_restore():
    saved = group(sig("add", i, i) for i in range(5)).apply_async()
    saved.save()
    restored = GroupResult.restore(saved.id, app=app)
    expect(restored.get(timeout=TIMEOUT), [0, 2, 4, 6, 8])
    restored.delete()
    expect(GroupResult.restore(saved.id, app=app), None, "restore after delete")
    return "saved, restored by id, deleted"


def row_forget():
    result = sig("add", 1, 2).apply_async()
    expect(result.get(timeout=TIMEOUT), 3)
    result.forget()
    expect(AsyncResult(result.id, app=app).state, "PENDING", "state after forget")
    return "the result read, forgotten, gone"


def row_expires():
    result = sig("add", 1, 2).apply_async(countdown=3, expires=1)
    expect(final_state(result), "REVOKED", "state")
    return "due after its expiry: REVOKED, not run"


def row_retry_backoff():
    started = time.time()
    value = sig("flaky", 2).apply_async().get(timeout=TIMEOUT)
    took = value["finished"] - started
    expect(value["retries"], 2, "retries")
    if took < 3:
        raise AssertionError(f"2 retries with backoff 1 s, 2 s took only {took:.1f} s")
    return f"2 retries, done after {took:.1f} s (backoff 1 s, 2 s)"


def row_link_error():
    errback = sig("record_error")
    errback_id = errback.freeze().id
    result = sig("fail").apply_async(link_error=errback)
    expect(AsyncResult(errback_id, app=app).get(timeout=TIMEOUT), result.id, "link_error got")
    expect(result.state, "FAILURE", "state")
    return "the errback ran with the failed task's id"


# -- control ------------------------------------------------------------------------------------
def row_revoke_countdown():
    result = sig("add", 1, 2).apply_async(countdown=4)
    result.revoke()
    expect(final_state(result), "REVOKED", "state")
    return "revoked before it was due: REVOKED, not run"


def row_revoke_running():
    """Four 15-s naps fill the queue's workers (a prefork and a threads worker of concurrency 2
    each); a few seconds in, all are revoked with terminate=True. A prefork task ends REVOKED (its
    child killed), a threads one runs to its end. States are read with get(), as the rpc backend
    needs (it cannot be polled for STARTED)."""
    queue = ARGS.get("queue", "cpu")
    results = [sig("nap", 15).apply_async(queue=queue) for _ in range(4)]
    time.sleep(4)
    revoked_at = time.time()
    for result in results:
        result.revoke(terminate=True)
    ends = {}
    for result in results:
        state = final_state(result, timeout=60)
        ends[result.id] = (state, time.time() - revoked_at, (result.result or {}).get("hostname", "")
                           if state == "SUCCESS" else "")
    terminated = [e for e in ends.values() if e[0] == "REVOKED"]
    ran_on = [e for e in ends.values() if e[0] == "SUCCESS"]
    if any("threads" not in hostname for _, _, hostname in ran_on) or len(terminated) + len(ran_on) != 4:
        raise AssertionError(f"after revoke(terminate=True), 15-s tasks ended {sorted(ends.values())}")
    if not terminated:
        raise ByDesign(f"{queue} runs on threads only here: all 4 ran on (a thread cannot be stopped: Celery's "
                       "threads pool has no terminate)")
    return (f"prefork: {len(terminated)} of {len(terminated)} running tasks terminated (REVOKED); threads: "
            f"{len(ran_on)} ran on to their end (a thread cannot be stopped: Celery's threads pool has no terminate)")


def row_inspect():
    try:
        replies = app.control.inspect(timeout=2).ping()
    except Exception as error:  # noqa: BLE001 (the refusal is the point)
        if "ACCESS_REFUSED" in str(error) or "403" in str(error):
            raise ByDesign("producers cannot read a reply queue: inspect and ping are for worker hosts "
                           "and Flower") from error
        raise
    raise AssertionError(f"a producer could inspect the workers (wider permissions than designed): {replies}")


def row_control_shutdown():
    """A producer's shutdown broadcast goes to the producers' mailbox, where workers accept revoke
    only; features.py compares the workers' MainPIDs before and after the suite."""
    try:
        app.control.broadcast("shutdown")
    except Exception as error:  # noqa: BLE001
        if "ACCESS_REFUSED" not in str(error):
            raise
        return "refused by the broker"
    time.sleep(2)
    expect(sig("add", 2, 2).apply_async().get(timeout=TIMEOUT), 4)
    return "sent; the workers ignore it (their MainPIDs are checked by the suite)"


# -- priorities and rate limits -----------------------------------------------------------------
def row_priority():
    """A backlog of naps on the default queue, then the same nap without and with priority 9.
    Counted among the backlog tasks still waiting when the two were sent (a nap started at its
    finish minus its length; the hosts share one clock here): how many each overtook. Tasks a
    worker has already prefetched cannot be overtaken, so the bar is half of those waiting. The
    naps are long enough (2 s) that the workers cannot drain the backlog while it is sent: with
    quorum queues and publisher confirms a producer sends some 30 tasks/s, and the cluster's io
    workers run 20 at once (with 0.05-s naps, 2 of 200 were still waiting there)."""
    if BROKER.startswith("redis"):
        raise NotApplicable("the Redis broker's priorities are kombu's fixed steps (0 highest); the routing table's "
                            "max_priority is RabbitMQ's")
    n, nap = SIZES["priority_backlog"], 2.0
    backlog = [sig("nap", nap).apply_async() for _ in range(n)]
    sent_at = time.time()
    control = sig("nap", nap).apply_async()
    urgent = sig("nap", nap).apply_async(priority=9)
    started = [r.get(timeout=TIMEOUT)["finished"] - nap for r in backlog]
    at_control, at_urgent = (r.get(timeout=TIMEOUT)["finished"] - nap for r in (control, urgent))
    waiting = [t for t in started if t > sent_at]
    overtaken = sum(1 for t in waiting if t > at_urgent)
    by_control = sum(1 for t in waiting if t > at_control)
    detail = (f"of {len(waiting)} of {n} tasks still waiting when sent, priority 9 overtook {overtaken}, the same "
              f"task without priority {by_control}")
    if len(waiting) < 20:
        raise AssertionError(f"{detail}: the backlog drained while it was sent (raise priority_backlog)")
    if overtaken < len(waiting) // 2 or overtaken <= by_control:
        raise AssertionError(detail)
    return detail


def row_rate_limit():
    results = [sig("limited").apply_async() for _ in range(4)]
    done = sorted((r.get(timeout=TIMEOUT)["finished"], r.result["hostname"]) for r in results)
    gaps = [round(b[0] - a[0], 1) for a, b in zip(done, done[1:])]
    instances = sorted({hostname.split("@")[0] for _, hostname in done})
    raise ByDesign(f"rate_limit 12/m holds per worker instance: 4 tasks on {len(instances)} instances "
                   f"({', '.join(instances)}), gaps {gaps} s")


ROWS = {
    "chain": row_chain, "group": row_group, "chord": row_chord, "chord-large": row_chord_large,
    "chord-in-chain": row_chord_in_chain, "chord-failing-header": row_chord_failing_header,
    "add-to-chord": row_add_to_chord, "chord-unordered": row_chord_unordered,
    "chord-claim-expired": row_chord_claim_expired, "chunks": row_chunks, "starmap": row_starmap, "map": row_map,
    "group-save-restore": row_group_save_restore, "forget": row_forget, "expires": row_expires,
    "retry-backoff": row_retry_backoff, "link-error": row_link_error, "revoke-countdown": row_revoke_countdown,
    "revoke-running": row_revoke_running, "priority": row_priority, "rate-limit": row_rate_limit,
    "inspect": row_inspect, "control-shutdown": row_control_shutdown,
}


def run(name):
    started = time.time()
    try:
        status, detail = "ok", ROWS[name]()
    except ByDesign as reason:
        status, detail = "by design", str(reason)
    except NotApplicable as reason:
        status, detail = "n/a", str(reason)
    except Exception as error:  # noqa: BLE001 (a row's failure is its result)
        design = BY_DESIGN.get((name, BACKEND))
        if design and isinstance(error, NotImplementedError):
            status, detail = "by design", design
        else:
            status, detail = "FAIL", f"{type(error).__name__}: {error}"[:300]
    return {"row": name, "status": status, "detail": detail, "seconds": round(time.time() - started, 1),
            "backend": BACKEND, "broker": BROKER}


if __name__ == "__main__":
    for row_name in ARGS.get("rows") or ROWS:
        print(json.dumps(run(row_name)), flush=True)
