"""The beat's single-instance lock with real `sagellm beat` processes and a real
redis-server: a second beat is refused, a beat whose lock was taken stops at once."""

from __future__ import annotations

import time

import pytest

from app.state import keys
from tests.integration.harness import ClusterEnv as Env
from tests.integration.harness import beat, wait_until

pytestmark = pytest.mark.integration


def _lock(env: Env) -> bytes | None:
    raw = env.cluster.registry.r.get(keys.BEAT_LOCK)
    assert raw is None or isinstance(raw, bytes)
    return raw


def test_beat_whose_lock_was_taken_by_another_token_exits_non_zero(env: Env) -> None:
    proc = env.start_beat()
    token = wait_until(lambda: _lock(env), 30, what="the beat's lock")
    wait_until(lambda: "beat: Starting" in proc.output(), 30, what="beat started")
    time.sleep(0.5)
    assert proc.alive(), proc.output()

    env.cluster.registry.r.set(keys.BEAT_LOCK, b"another-beat", ex=60)
    started = time.monotonic()
    wait_until(lambda: not proc.alive(), 10, interval=0.1, what="the beat to exit")
    took = time.monotonic() - started

    assert proc.proc is not None and proc.proc.returncode not in (0, None), proc.output()
    assert "beat lost its lock" in proc.output()
    assert took < 10
    # the other beat's lock is left as it was
    assert _lock(env) == b"another-beat" and token != b"another-beat"


def test_beat_whose_lock_vanished_exits_rather_than_taking_it_again(env: Env) -> None:
    proc = env.start_beat()
    wait_until(lambda: _lock(env), 30, what="the beat's lock")
    wait_until(lambda: "beat: Starting" in proc.output(), 30, what="beat started")
    env.cluster.registry.r.delete(keys.BEAT_LOCK)
    wait_until(lambda: not proc.alive(), 10, interval=0.1, what="the beat to exit")
    assert proc.proc is not None and proc.proc.returncode not in (0, None), proc.output()
    assert "beat lost its lock" in proc.output()
    assert _lock(env) is None


def test_second_beat_is_refused_and_a_clean_stop_frees_the_lock(env: Env) -> None:
    first = env.start_beat()
    token = wait_until(lambda: _lock(env), 30, what="the beat's lock")
    wait_until(lambda: "beat: Starting" in first.output(), 30, what="beat started")

    second = beat(env.env, env.tmp / "logs-second").start()
    env.procs["beat-second"] = second
    wait_until(lambda: not second.alive(), 30, what="the second beat to give up")
    assert second.proc is not None and second.proc.returncode != 0
    assert "another beat is running" in second.output()
    assert first.alive() and _lock(env) == token

    first.stop()
    assert first.proc is not None and first.proc.returncode == 0, first.output()
    assert _lock(env) is None
