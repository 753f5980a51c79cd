"""The engine state machine's rules as methods of ``EngineRecord``: each moves the record
and its bookkeeping together, or refuses (``IllegalTransition``) and changes nothing."""

from __future__ import annotations

import copy
import time

import pytest

from app.core.errors import IllegalTransition
from app.core.models import LIVE_STATES, EngineRecord, EngineState, check_transition
from app.core.spec import EngineSpec

S = EngineState


def _rec(state: EngineState = S.PENDING, **fields: object) -> EngineRecord:
    rec = EngineRecord(id="eng-t", spec=EngineSpec(model="m"), state=state)
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


def _refused(rec: EngineRecord, change: object) -> None:
    before = copy.deepcopy(rec)
    with pytest.raises(IllegalTransition):
        change(rec)  # type: ignore[operator]
    assert rec == before, "a refused change must leave the record as it was"


def _running(pid: int = 10) -> EngineRecord:
    return _rec(S.RUNNING, pid=pid, process_create_time=1.0, running_since=time.time())


# ---------------------------------------------------------------- derived rules


@pytest.mark.parametrize("state", list(S))
def test_stopped_or_stopping_is_what_refuses_stop_restart_and_fail(state: EngineState) -> None:
    rec = _rec(state, pid=10, process_create_time=1.0)
    ending = state in (S.DRAINING, S.STOPPING, S.STOPPED)
    assert rec.stopped_or_stopping is ending
    if ending:  # the stop's to finish: no restart, no failure, no crash bookkeeping
        _refused(rec, lambda r: r.request_restart())
        _refused(rec, lambda r: r.fail("x"))
        _refused(rec, lambda r: r.pend_restart("x", pid=10, exit_code=1, restart_count=1, at=0.0))


@pytest.mark.parametrize(
    ("state", "restart_at", "settled", "owns_nothing", "in_service"),
    [
        (S.PENDING, None, False, False, True),
        (S.STARTING, None, False, False, True),
        (S.RUNNING, None, True, False, True),
        (S.UNHEALTHY, None, False, False, True),
        (S.UNHEALTHY, 5.0, False, False, True),
        (S.LOST, None, False, False, True),
        (S.FAILED, 5.0, False, False, True),
        (S.FAILED, None, True, True, False),
        (S.DRAINING, None, False, False, False),
        (S.STOPPING, None, False, False, False),
        (S.STOPPED, None, True, True, False),
    ],
)
def test_settled_owns_nothing_and_in_service_per_state(
    state: EngineState,
    restart_at: float | None,
    settled: bool,
    owns_nothing: bool,
    in_service: bool,
) -> None:
    rec = _rec(state, next_restart_at=restart_at)
    assert (rec.settled, rec.owns_nothing, rec.in_service) == (settled, owns_nothing, in_service)
    assert rec.restart_pending is (restart_at is not None)


def test_only_pending_or_restart_pending_engines_await_a_spawn() -> None:
    assert _rec(S.PENDING).awaits_spawn
    for state in (S.FAILED, S.UNHEALTHY, S.LOST):
        assert _rec(state, next_restart_at=1.0).awaits_spawn
        assert not _rec(state).awaits_spawn
    for state in (S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED):
        assert not _rec(state, next_restart_at=1.0).awaits_spawn


# ---------------------------------------------------------------- start


def test_first_start_records_the_process_without_counting_a_restart() -> None:
    rec = _rec(S.PENDING)
    rec.mark_starting(42, 9.5, log_path="/l", start_deadline=100.0)
    assert rec.state is S.STARTING and (rec.pid, rec.process_create_time) == (42, 9.5)
    assert rec.restart_count == 0 and rec.start_deadline == 100.0 and rec.log_path == "/l"


def test_a_due_restart_counts_unless_a_person_asked_for_it() -> None:
    rec = _rec(S.FAILED, next_restart_at=1.0, restart_count=1, exit_code=3, health_failures=4)
    rec.mark_starting(42, 9.5, log_path="/l", start_deadline=100.0)
    assert rec.state is S.STARTING and rec.restart_count == 2
    assert rec.next_restart_at is None and rec.exit_code is None and rec.health_failures == 0
    manual = _rec(S.UNHEALTHY, next_restart_at=1.0, restart_count=1)
    manual.mark_starting(42, 9.5, log_path="/l", start_deadline=100.0, count_restart=False)
    assert manual.restart_count == 1


@pytest.mark.parametrize(
    "rec",
    [_rec(S.STOPPING), _rec(S.STOPPED), _rec(S.FAILED), _rec(S.RUNNING), _rec(S.STARTING)],
    ids=lambda r: r.state.value,
)
def test_start_is_refused_unless_the_engine_awaits_it(rec: EngineRecord) -> None:
    _refused(rec, lambda r: r.mark_starting(1, 1.0, log_path="/l", start_deadline=1.0))


def test_ready_process_runs_and_a_stale_pid_is_refused() -> None:
    rec = _rec(S.STARTING, pid=7)
    _refused(rec, lambda r: r.mark_running(8))
    rec.mark_running(7)
    assert rec.state is S.RUNNING and rec.running_since is not None and rec.health_failures == 0


def test_ready_process_without_its_reservation_is_unhealthy() -> None:
    rec = _rec(S.STARTING, pid=7, reservation_error="room taken")
    rec.mark_running(7)
    assert rec.state is S.UNHEALTHY and rec.last_error == "room taken"


def test_link_process_starts_a_waiting_engine_and_refuses_an_ended_one() -> None:
    rec = _rec(S.FAILED, next_restart_at=3.0)
    rec.link_process(5, 1.0, log_path="/l", start_deadline=50.0)
    assert rec.state is S.STARTING and rec.pid == 5 and rec.next_restart_at is None
    running = _running(pid=4)
    running.link_process(5, 2.0, log_path="/l", start_deadline=50.0)
    assert running.state is S.RUNNING and running.pid == 5  # state kept, process re-linked
    _refused(_rec(S.STOPPED), lambda r: r.link_process(5, 1.0, log_path="/l", start_deadline=1))


def test_adopt_recreates_the_state_the_process_shows() -> None:
    ready = _rec(S.STOPPING, next_restart_at=4.0, reservation_error="x")
    ready.adopt(5, 1.0, ready=True, start_deadline=50.0)
    assert ready.state is S.RUNNING and ready.start_deadline is None
    assert ready.next_restart_at is None and ready.reservation_error is None
    waiting = _rec(S.RUNNING)
    waiting.adopt(5, 1.0, ready=False, start_deadline=50.0)
    assert waiting.state is S.STARTING and waiting.start_deadline == 50.0


# ---------------------------------------------------------------- health


def test_health_checks_move_running_and_unhealthy() -> None:
    rec = _running(pid=3)
    rec.count_failed_checks(3, 1, unhealthy=None)
    assert rec.state is S.RUNNING and rec.health_failures == 1
    rec.count_failed_checks(3, 3, unhealthy="3 failed health checks")
    assert rec.state is S.UNHEALTHY and rec.last_error == "3 failed health checks"
    rec.mark_healthy(3)
    assert rec.state is S.RUNNING and rec.health_failures == 0


def test_health_of_another_process_or_state_is_refused() -> None:
    _refused(_running(pid=3), lambda r: r.mark_healthy(4))
    _refused(_rec(S.STARTING, pid=3), lambda r: r.count_failed_checks(3, 1, unhealthy=None))


def test_unhealthy_without_reservation_stays_unhealthy_when_healthy() -> None:
    rec = _rec(S.UNHEALTHY, pid=3, reservation_error="taken")
    rec.mark_healthy(3)
    assert rec.state is S.UNHEALTHY


def test_reservation_lost_and_retaken() -> None:
    rec = _running()
    rec.mark_unreserved("running without its reservation: taken")
    assert rec.state is S.UNHEALTHY and rec.reservation_error == rec.last_error
    rec.mark_reserved()
    assert rec.reservation_error is None and rec.last_error == "reservation re-taken"


@pytest.mark.parametrize(
    ("answers", "reserved", "state", "failures"),
    [
        (True, True, S.RUNNING, 0),
        (True, False, S.UNHEALTHY, 0),
        (False, True, S.UNHEALTHY, 1),
    ],
)
def test_return_from_lost(answers: bool, reserved: bool, state: EngineState, failures: int) -> None:
    rec = _rec(S.LOST, pid=3)
    rec.return_from_lost(answers=answers, reserved=reserved, detail="/health answered 500")
    assert rec.state is state and rec.health_failures == failures
    if state is S.UNHEALTHY:
        assert rec.last_error == "/health answered 500"
    _refused(_running(), lambda r: r.return_from_lost(answers=True, reserved=True, detail=""))


# ---------------------------------------------------------------- death, restart, failure


@pytest.mark.parametrize(
    ("state", "waits_as"),
    [
        (S.RUNNING, S.UNHEALTHY),
        (S.UNHEALTHY, S.UNHEALTHY),
        (S.STARTING, S.FAILED),
        (S.LOST, S.FAILED),
    ],
)
def test_a_dead_process_waits_for_its_restart_keeping_its_room(
    state: EngineState, waits_as: EngineState
) -> None:
    rec = _rec(state, pid=9, process_create_time=1.0, running_since=2.0)
    rec.pend_restart("exited", pid=9, exit_code=1, restart_count=2, at=77.0)
    assert rec.state is waits_as and rec.next_restart_at == 77.0
    assert (rec.pid, rec.process_create_time, rec.running_since) == (None, None, None)
    assert rec.restart_count == 2 and rec.exit_code == 1 and rec.last_error == "exited"
    assert not rec.owns_nothing and rec.awaits_spawn


def test_pend_restart_is_refused_for_another_process_or_a_stop() -> None:
    kw = {"pid": 9, "exit_code": None, "restart_count": 0, "at": 1.0}
    _refused(_running(pid=8), lambda r: r.pend_restart("x", **kw))
    _refused(_rec(S.STOPPING, pid=9), lambda r: r.pend_restart("x", **kw))


def test_fail_ends_for_good_from_every_live_state() -> None:
    for state in (S.PENDING, S.STARTING, S.RUNNING, S.UNHEALTHY, S.LOST):
        rec = _rec(state, pid=9, next_restart_at=3.0, running_since=1.0)
        rec.fail("boom")
        assert rec.state is S.FAILED and rec.owns_nothing and rec.settled
        assert rec.last_error == "boom" and rec.pid is None and rec.running_since is None
    pending = _rec(S.FAILED, next_restart_at=3.0)
    pending.fail("gave up")
    assert pending.owns_nothing and pending.last_error == "gave up"


def test_fail_leaves_a_stop_to_finish_and_another_process_alone() -> None:
    _refused(_rec(S.STOPPING, pid=9), lambda r: r.fail("x"))
    _refused(_rec(S.STOPPED), lambda r: r.fail("x"))
    _refused(_running(pid=10), lambda r: r.fail("x", pid=9))
    rec = _running(pid=9)
    rec.fail("x", pid=9)
    assert rec.state is S.FAILED


def test_a_requested_restart_is_due_now_and_keeps_pending_pending() -> None:
    rec = _running(pid=9)
    rec.request_restart()
    assert rec.state is S.UNHEALTHY and rec.pid is None and rec.restart_pending
    assert rec.last_error == "restart requested"
    pending = _rec(S.PENDING)
    pending.request_restart()
    assert pending.state is S.PENDING and pending.restart_pending
    for ended in (_rec(S.STOPPING), _rec(S.STOPPED), _rec(S.FAILED)):
        _refused(ended, EngineRecord.request_restart)


def test_retry_failed_only_for_an_engine_that_failed_for_good() -> None:
    rec = _rec(S.FAILED, restart_count=3)
    rec.retry_failed()
    assert rec.restart_count == 0 and rec.restart_pending and not rec.owns_nothing
    _refused(_rec(S.FAILED, next_restart_at=1.0), EngineRecord.retry_failed)
    _refused(_rec(S.STOPPED), EngineRecord.retry_failed)


# ---------------------------------------------------------------- stop


def test_stop_of_a_live_engine_then_its_end() -> None:
    rec = _running(pid=9)
    rec.request_stop()
    assert rec.state is S.STOPPING and not rec.owns_nothing
    rec.mark_stopped()
    assert rec.state is S.STOPPED and rec.pid is None and rec.owns_nothing


def test_stop_of_a_restart_pending_failed_engine_is_immediate() -> None:
    rec = _rec(S.FAILED, next_restart_at=5.0)
    rec.request_stop()
    assert rec.state is S.STOPPED and not rec.restart_pending


def test_mark_stopped_is_refused_where_the_state_machine_forbids_it() -> None:
    _refused(_running(), EngineRecord.mark_stopped)
    _refused(_rec(S.STARTING), EngineRecord.mark_stopped)


def test_a_restart_is_due_only_once_its_time_has_come() -> None:
    rec = _rec(S.FAILED, next_restart_at=100.0)
    assert not rec.restart_due(99.9) and rec.restart_due(100.0)
    assert not _rec(S.FAILED).restart_due(1e12)


# ---------------------------------------------------------------- drain before stop


def _draining(pid: int = 9, deadline: float = 50.0) -> EngineRecord:
    rec = _running(pid=pid)
    rec.start_drain(deadline)
    return rec


@pytest.mark.parametrize("state", [S.RUNNING, S.UNHEALTHY])
def test_a_serving_engine_drains_keeping_its_room_and_process(state: EngineState) -> None:
    rec = _rec(state, pid=9, process_create_time=1.0)
    assert rec.drainable
    rec.start_drain(123.0)
    assert rec.state is S.DRAINING and rec.drain_deadline == 123.0
    assert rec.pid == 9 and not rec.owns_nothing and not rec.settled
    assert not rec.in_service, "the gateway sends a draining engine nothing new"
    assert S.DRAINING in LIVE_STATES
    assert not rec.drain_over(122.9) and rec.drain_over(123.0)


@pytest.mark.parametrize(
    "rec",
    [
        _rec(S.PENDING),
        _rec(S.STARTING, pid=9),
        _rec(S.UNHEALTHY, next_restart_at=5.0),  # its process died: nothing to drain
        _rec(S.UNHEALTHY),  # no process
        _rec(S.LOST, pid=9),
        _rec(S.FAILED, next_restart_at=5.0),
        _rec(S.STOPPING, pid=9),
        _rec(S.STOPPED),
        _rec(S.DRAINING, pid=9, drain_deadline=5.0),
    ],
    ids=lambda r: f"{r.state.value}-pid{r.pid}-restart{r.next_restart_at}",
)
def test_only_a_serving_engine_with_its_process_drains(rec: EngineRecord) -> None:
    assert not rec.drainable
    _refused(rec, lambda r: r.start_drain(99.0))


def test_a_drain_ends_in_the_normal_stop() -> None:
    rec = _draining()
    rec.request_stop()
    assert rec.state is S.STOPPING and rec.pid == 9 and not rec.owns_nothing
    rec.mark_stopped()
    assert rec.state is S.STOPPED and rec.owns_nothing


def test_a_draining_engine_whose_process_is_gone_is_stopped() -> None:
    rec = _draining()
    rec.mark_stopped()
    assert rec.state is S.STOPPED and rec.pid is None and rec.owns_nothing


def test_a_draining_engine_is_left_to_its_stop() -> None:
    kw = {"pid": 9, "exit_code": 1, "restart_count": 0, "at": 1.0}
    _refused(_draining(), lambda r: r.pend_restart("exited", **kw))
    _refused(_draining(), lambda r: r.fail("boom"))
    _refused(_draining(), EngineRecord.request_restart)
    _refused(_draining(), lambda r: r.mark_healthy(9))
    _refused(_draining(), lambda r: r.count_failed_checks(9, 3, unhealthy="down"))
    _refused(_draining(), lambda r: r.mark_running(9))
    rec = _draining()
    rec.mark_unreserved("running without its reservation: taken")
    assert rec.state is S.DRAINING, "a drain is not undone by a lost reservation"


def test_draining_leaves_only_to_stopping_or_lost() -> None:
    for new in S:
        allowed = new in (S.STOPPING, S.LOST)
        if allowed:
            check_transition(S.DRAINING, new)
        else:
            with pytest.raises(IllegalTransition):
                check_transition(S.DRAINING, new)
    for old in (S.PENDING, S.STARTING, S.STOPPING, S.STOPPED, S.FAILED):
        with pytest.raises(IllegalTransition):
            check_transition(old, S.DRAINING)


def test_a_draining_engine_lost_with_its_host_returns_to_its_drain() -> None:
    rec = _draining(deadline=60.0)
    rec.transition(S.LOST, error="host a is down")
    rec.return_from_lost(answers=True, reserved=True, detail="")
    assert rec.state is S.DRAINING and rec.drain_deadline == 60.0


def test_a_second_stop_of_a_draining_engine_skips_the_rest_of_the_drain() -> None:
    rec = _draining()
    rec.request_stop()
    rec.request_stop()  # already stopping: nothing changes
    assert rec.state is S.STOPPING
