"""Which processes belong to an engine: identity, session and tag rules. No signals
(``workers.host.processes`` sends them), no Redis.

The tag is not enough to find an engine's processes: vLLM renames its processes
(API server, engine core, tensor-parallel workers) with ``setproctitle``, which
overwrites the memory ``/proc/<pid>/environ`` reads, so a renamed process shows no tag.
An engine is therefore identified by its leader's identity as ``spawn`` recorded it,
(pid, create time) (the create time excludes a reused pid), and its processes are that
leader, the members of its session and process group, and their descendants. A leader
is ours when its identity matches or, without a create time, when it carries our tag;
a readable tag of another engine is proof that it is not ours (``NotOurProcess``), and
a pid alone is never trusted. Members of the session stay ours after the leader dies:
Linux does not hand a pid out again while processes still use it as their session or
group id, so the session cannot have been reused while it has members; as a cheap extra
guard only processes created no earlier than the leader count, and without a create
time only tagged ones. ``engine_tree`` is that tree; ``workers.host.processes`` stops it.
"""

from __future__ import annotations

import os
import time

import psutil

from app.core.engine_policy import ENGINE_ID_ENV

# psutil derives create_time from clock ticks (1/100 s on Linux); the value is stable
# for one process, so the tolerance only absorbs float round-trips through JSON.
CREATE_TIME_TOLERANCE_S = 1e-2


def same_process(proc: psutil.Process, create_time: float | None) -> bool:
    if create_time is None:
        return True
    return abs(proc.create_time() - create_time) <= CREATE_TIME_TOLERANCE_S


def running(proc: psutil.Process) -> bool:
    # is_running() also compares create time, so a reused pid reads as not running.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


# A process younger than this may be between two execs (``#!/usr/bin/env python3`` runs
# env, which execs python): /proc/<pid>/environ can read empty for that instant.
_EXEC_SETTLE_S = 1.0


def tag_of(proc: psutil.Process, *, settle: bool = True) -> str | None:
    """The process's ``SAGELLM_ENGINE_ID``; None when absent or unreadable (or wiped by
    ``setproctitle``).

    With ``settle``, a just-spawned engine (a stop right after its start, as in a
    rollback) is read again for up to ~0.2 s rather than taken for a stranger while it
    is still exec'ing.
    """
    for _ in range(10 if settle else 1):
        try:
            tag = proc.environ().get(ENGINE_ID_ENV) or None
            if tag is not None or time.time() - proc.create_time() > _EXEC_SETTLE_S:
                return tag
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None
        time.sleep(0.02)
    return None


def _session_members(sid: int) -> list[psutil.Process]:
    """Processes (but this one) in session ``sid`` or in process group ``sid``."""
    out = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if os.getsid(proc.pid) == sid or os.getpgid(proc.pid) == sid:
                out.append(proc)
        except OSError:
            continue
    return out


def resolve_leader(pid: int, create_time: float | None) -> tuple[psutil.Process | None, bool]:
    """(the leader if it still runs, whether its session may still have members).

    A pid now held by another process means ours is gone, and so is its session: a pid
    is not handed out again while a session or group still uses it as its id.
    """
    if pid <= 0:
        return None, False
    try:
        proc = psutil.Process(pid)
        if not same_process(proc, create_time):
            return None, False
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None, True
        return proc, True
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None, True


def _member_is_ours(
    proc: psutil.Process, create_time: float | None, engine_id: str | None, *, leader_runs: bool
) -> bool:
    """Whether ``proc``, found in our leader's session or group or below it, is ours.

    It is, unless it is older than the leader, carries another engine's tag, or (the
    leader gone and no create time known, so nothing proves whose session this was)
    carries no tag at all.
    """
    try:
        if proc.pid == os.getpid():
            return False
        if create_time is not None and proc.create_time() < create_time - CREATE_TIME_TOLERANCE_S:
            return False
    except psutil.Error:
        return False
    tag = tag_of(proc, settle=False)
    if tag is not None and engine_id is not None and tag != engine_id:
        return False
    if create_time is None and not leader_runs:
        return (tag or tag_of(proc)) is not None
    return True


def tree(
    pid: int, create_time: float | None, engine_id: str | None, leader: psutil.Process | None
) -> list[psutil.Process]:
    """``leader`` (when given: the caller has checked it is ours and runs), the running
    members of session/group ``pid`` that are ours, and their running descendants."""
    runs = leader is not None
    roots = [leader] if leader is not None else []
    if pid not in (os.getsid(0), os.getpgrp()):  # never our own session or group
        roots += [
            p
            for p in _session_members(pid)
            if p.pid != pid and _member_is_ours(p, create_time, engine_id, leader_runs=runs)
        ]
    below: list[psutil.Process] = []
    for root in roots:
        try:
            below += root.children(recursive=True)
        except psutil.Error:
            continue
    known = {p.pid for p in roots}
    below = [
        p
        for p in unique(below)
        if p.pid not in known and _member_is_ours(p, create_time, engine_id, leader_runs=runs)
    ]
    return [p for p in unique([*roots, *below]) if running(p)]


def leader_is_ours(
    leader: psutil.Process, create_time: float | None, engine_id: str | None
) -> tuple[bool, str | None]:
    """(ours, its readable tag): ours by identity (a create time was given and matched)
    or by tag, never with another engine's tag."""
    tag = tag_of(leader)
    if tag is not None and engine_id is not None and tag != engine_id:
        return False, tag
    return create_time is not None or tag is not None, tag


def engine_tree(
    pid: int, create_time: float | None, *, engine_id: str | None = None
) -> list[psutil.Process]:
    """The running processes of the engine whose leader ``spawn`` started as (``pid``,
    ``create_time``): the leader while it is that process, the members of its session
    and process group, and their descendants (also those that left the session).

    Members count after the leader died (e.g. tensor-parallel workers of a crashed API
    server, renamed so that they show no tag); only those created no earlier than the
    leader, never one tagged for another engine than ``engine_id``. Without a create
    time, only tagged processes count. Zombies are left out; [] when the pid now belongs
    to another process.
    """
    leader, may_have_members = resolve_leader(pid, create_time)
    if not may_have_members:
        return []
    if leader is not None and not leader_is_ours(leader, create_time, engine_id)[0]:
        return []
    return tree(pid, create_time, engine_id, leader)


def unique(procs: list[psutil.Process]) -> list[psutil.Process]:
    seen: dict[int, psutil.Process] = {}
    for p in procs:
        seen.setdefault(p.pid, p)
    return list(seen.values())
