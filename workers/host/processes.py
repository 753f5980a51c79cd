"""Engine processes on this host: spawn, check, stop, find again. No Redis, no Celery.

Ownership: every engine is started with ``SAGELLM_ENGINE_ID`` in its environment (its
children inherit it) and in a session of its own (``start_new_session``): it is the
leader of its session and process group (pid == session id == group id), so a signal to
the group reaches vLLM's tensor-parallel workers, and Ctrl-C or SIGTERM to the worker's
own group does not reach engines. (Under systemd, run the worker with
``KillMode=process`` so that restarting it does not kill the engines in its cgroup.)

Which processes belong to an engine (its leader's identity, its session and group, the
tag rules) is ``workers.host.process_tree``; ``stop`` stops that whole tree,
``sweep_session`` the processes a dead leader left behind, and
``find_tagged_processes`` (rediscovery) finds engines by the tags still readable.

Reaping: an engine is a child of the process that spawned it (the worker, or one of its
pool processes). A child that exits stays a zombie until its parent waits for it, and
``subprocess.Popen`` must not do that waiting behind our back: a dropped ``Popen`` whose
child is running is put on ``subprocess._active`` and reaped by the next ``Popen()``
anywhere in the process, losing the exit code. So ``spawn`` keeps each ``Popen`` in a
module table until ``reap_children`` (called by the health loop, by ``stop`` and by
``exit_code``) collects it with ``waitpid(pid, WNOHANG)``, per pid: never
``waitpid(-1)``, which would steal the status of children that are not engines (Celery's
pool processes, other subprocesses). Exit codes are kept by pid for ``exit_code``
(negative = killed by that signal, as in ``subprocess``). The worker's exit watch
(``workers.agent.watch``) learns of an exit from ``open_exit_handle`` (a pidfd, which
never reaps) and then calls ``reap_children``. Correctness never depends on
reaping: ``is_alive`` counts a zombie as dead. When the spawning process exits, its
engines are re-parented (to init or a subreaper), keep running and are reaped there;
their exit codes are then unknown here (``exit_code`` returns None) and rediscovery
finds the engines again with ``find_tagged_processes``. Nothing here kills children at
exit.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from app.core.engine_policy import ENGINE_ID_ENV
from app.core.errors import SagellmError
from workers.host import process_tree
from workers.runtimes.base import LaunchPlan, RuntimeUnavailable

_POLL_S = 0.05
_KILL_WAIT_S = 5.0  # SIGKILL is not refusable; this only bounds a process in D state
_MAX_EXIT_CODES = 1024  # remembered exit codes, oldest forgotten first


class NotOurProcess(SagellmError):
    """A pid that is alive but carries another engine's ``SAGELLM_ENGINE_ID``, or
    neither a matching create time nor our tag: never signalled."""

    status_code = 409


@dataclass(frozen=True)
class SpawnedProcess:
    pid: int
    create_time: float  # psutil's; with the pid, identifies the process across pid reuse


@dataclass(frozen=True)
class StopResult:
    exited: bool  # the engine's leader process is gone (true for one already gone)
    killed: bool  # SIGKILL was needed for it or for a process of its session
    exit_code: int | None  # when it was our child and we reaped it; -N = signal N


@dataclass(frozen=True)
class TaggedProcess:
    """An engine's top process as found on the host (see ``find_tagged_processes``)."""

    engine_id: str
    pid: int
    create_time: float
    cmdline: tuple[str, ...]
    session_leader: bool  # pid == session id: started by spawn, not an orphaned worker

    @property
    def ports(self) -> tuple[int, ...]:
        """TCP ports it listens on now (read when asked: a few ms per process, which
        a scan for one engine's process should not pay for every engine)."""
        try:
            proc = psutil.Process(self.pid)
            if not process_tree.same_process(proc, self.create_time):
                return ()
        except psutil.Error:
            return ()
        return _listening_ports(proc)


_lock = threading.Lock()
_children: dict[int, subprocess.Popen[bytes]] = {}
_exit_codes: OrderedDict[int, int] = OrderedDict()


def _forget_children() -> None:
    # A forked child (e.g. a Celery pool process) is not the parent of our engines:
    # waitpid there would fail. It starts with empty tables and a fresh lock (the
    # parent's lock may have been held by another thread at fork time).
    global _lock
    _lock = threading.Lock()
    _children.clear()
    _exit_codes.clear()


os.register_at_fork(after_in_child=_forget_children)


# ---------------------------------------------------------------------------- spawn


# The control plane's own variables: an engine never inherits them from the worker
# (the admin token, API keys, the Redis URL, Celery's and Flower's settings, the API's
# metrics directory). The tags an engine does carry come from ``plan.env``.
_CONTROL_PLANE_PREFIXES = ("SAGELLM_", "CELERY_", "FLOWER_")
_CONTROL_PLANE_NAMES = frozenset({"PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC"})


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What an engine inherits of the worker's ``environ``: all but the control plane's."""
    return {
        k: v
        for k, v in environ.items()
        if not k.upper().startswith(_CONTROL_PLANE_PREFIXES)
        and k.upper() not in _CONTROL_PLANE_NAMES
    }


def spawn(plan: LaunchPlan, log_path: Path) -> SpawnedProcess:
    """Start ``plan`` in its own session, stdout and stderr appended to ``log_path``.

    The environment is the worker's less the control plane's variables
    (``inherited_env``), with ``plan.env`` on top; argv is executed directly (never
    through a shell). ``RuntimeUnavailable`` if the executable cannot be run.
    """
    engine_id = plan.env.get(ENGINE_ID_ENV)
    if not engine_id:
        # Invariant "ours only": an untagged process could never be found or stopped.
        raise ValueError(f"refusing to spawn without {ENGINE_ID_ENV}: {plan.argv[:3]}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**inherited_env(os.environ), **plan.env}
    with open(log_path, "ab") as log:  # append: one log across restarts of an engine
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== sagellm {stamp} engine {engine_id}: {shlex.join(plan.argv)}\n".encode())
        log.flush()
        with _lock:  # a concurrent reap must not collect the child before it is tracked
            try:
                popen = subprocess.Popen(
                    plan.argv,
                    env=env,
                    cwd=plan.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                log.write(f"=== sagellm: cannot start: {exc}\n".encode())
                raise RuntimeUnavailable(
                    f"engine {engine_id}: cannot execute {plan.argv[0]!r}: {exc.strerror or exc}"
                ) from exc
            _children[popen.pid] = popen
            _exit_codes.pop(popen.pid, None)  # a code for an older process with this pid
            # Read while unreaped: even a child that already exited is still a zombie.
            create_time = psutil.Process(popen.pid).create_time()
    return SpawnedProcess(pid=popen.pid, create_time=create_time)


# ---------------------------------------------------------------------------- reaping


def reap_children() -> dict[int, int]:
    """Collect our engine children that have exited; return ``{pid: exit_code}`` of those
    collected now (exit code negative = killed by that signal). Never blocks."""
    reaped: dict[int, int] = {}
    with _lock:
        for pid, popen in list(_children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Someone else waited for it (SIGCHLD ignored, a stray waitpid(-1)):
                # gone, code unknown.
                popen.returncode = -1
                del _children[pid]
                continue
            if done == 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            popen.returncode = code  # so Popen.__del__ never waits on a reused pid
            del _children[pid]
            _exit_codes[pid] = code
            _exit_codes.move_to_end(pid)
            while len(_exit_codes) > _MAX_EXIT_CODES:
                _exit_codes.popitem(last=False)
            reaped[pid] = code
    return reaped


def exit_code(pid: int) -> int | None:
    """Exit code of engine child ``pid`` once it has exited (reaping it now if needed);
    None while it runs or when it was not our child."""
    reap_children()
    with _lock:
        return _exit_codes.get(pid)


def is_child(pid: int) -> bool:
    """``pid`` is an engine this process spawned and has not reaped yet."""
    with _lock:
        return pid in _children


# ---------------------------------------------------------------------------- exit watch


def open_exit_handle(pid: int, create_time: float | None) -> int | None:
    """A file descriptor that becomes readable when process ``pid`` exits (a pidfd:
    Linux 5.3+), for ``select``/``poll``; the caller closes it. Works for any process,
    our child or not, and never reaps (a child's exit code stays for
    ``reap_children``). None when pidfds are not available here; ``ProcessLookupError``
    when the process (the one started at ``create_time``, when given) is already gone.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except ProcessLookupError:
        raise
    except OSError:  # ENOSYS (old kernel), EPERM (seccomp): watch by polling
        return None
    # The pid may have been handed to another process before we opened it: the fd is
    # for the process that holds the pid now, so check that it is the one we mean.
    if create_time is not None and not is_alive(pid, create_time):
        os.close(fd)
        raise ProcessLookupError(pid)
    return fd


# ---------------------------------------------------------------------------- checking


def is_alive(pid: int, create_time: float | None) -> bool:
    """True if ``pid`` runs, is the process started at ``create_time`` (when given), and
    is not a zombie."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if not process_tree.same_process(proc, create_time):
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # it exists; only its owner can see more


# ---------------------------------------------------------------------------- signalling


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid``'s process group when ``pid`` leads it (engines do), else
    to ``pid`` alone: never to a group we did not start, least of all our own. False if
    the process is gone. Callers check ownership first (``stop`` does)."""
    try:
        pgid = os.getpgid(pid)
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _signal_each(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil checks identity first: safe across pid reuse
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for ``procs`` to exit (reaping ours); return the living."""
    deadline = time.monotonic() + timeout_s
    while True:
        reap_children()
        alive = [p for p in procs if process_tree.running(p)]
        remaining = deadline - time.monotonic()
        if not alive or remaining <= 0:
            return alive
        time.sleep(min(_POLL_S, remaining))


def stop(
    pid: int, create_time: float | None, grace_s: float, *, engine_id: str | None = None
) -> StopResult:
    """Stop the engine whose leader is ``pid``: SIGTERM to its process group, up to
    ``grace_s`` for it and every process of its tree (``engine_tree``) to exit, then
    SIGKILL to what is left (the group, stragglers of the session, descendants that left
    it).

    The leader is signalled only when it is ours: the process started at
    ``create_time``, or (no create time given) a process tagged ``engine_id`` (any tag
    without ``engine_id``); never one tagged for another engine. Else ``NotOurProcess``
    and nothing is sent. The rest of the tree is ours by membership, so vLLM processes
    renamed by ``setproctitle`` (no readable tag) are stopped too. Idempotent: a leader
    already gone (or a pid now held by another process) gives ``exited=True`` after
    ``sweep_session`` of what it left behind (e.g. vLLM workers orphaned by a crashed
    leader).
    """
    reap_children()
    leader, may_have_members = process_tree.resolve_leader(pid, create_time)
    if leader is None:
        killed = may_have_members and _sweep(pid, create_time, engine_id, grace_s)[1]
        return StopResult(exited=True, killed=killed, exit_code=exit_code(pid))

    ours, tag = process_tree.leader_is_ours(leader, create_time, engine_id)
    if not ours:
        raise NotOurProcess(
            f"pid {pid} ({_describe(leader)}) carries "
            + (f"{ENGINE_ID_ENV}={tag}" if tag else f"no readable {ENGINE_ID_ENV}")
            + (f", not {engine_id}" if engine_id and tag else "")
            + ("" if tag or create_time is not None else " and no create time was given")
            + ": not signalled"
        )
    members = process_tree.tree(pid, create_time, engine_id, leader)
    in_group = {p.pid for p in members if _pgid(p.pid) == pid}
    signal_group(pid, signal.SIGTERM)
    # Processes that left the group (setpgid/setsid) got nothing from killpg. Members
    # of the group are not signalled twice: a second SIGTERM makes uvicorn skip its
    # graceful shutdown.
    _signal_each([p for p in members if p.pid not in in_group], signal.SIGTERM)
    alive = _wait_gone(members, grace_s)
    # Late forks during shutdown are found by a fresh scan, by the rule of a dead
    # leader's session (the leader may have exited by now).
    late = process_tree.tree(pid, create_time, engine_id if engine_id else tag, None)
    leftovers = process_tree.unique([*alive, *late])
    killed = bool(leftovers)
    if killed:
        if process_tree.running(leader):
            signal_group(pid, signal.SIGKILL)
        _signal_each(leftovers, signal.SIGKILL)
        _wait_gone(leftovers, _KILL_WAIT_S)
    return StopResult(
        exited=not process_tree.running(leader), killed=killed, exit_code=exit_code(pid)
    )


def sweep_session(
    pid: int, create_time: float | None, grace_s: float, *, engine_id: str | None = None
) -> int:
    """Terminate what the dead leader (``pid``, ``create_time``) of an engine left
    behind: SIGTERM to every process of its tree (``engine_tree``: its session and
    process group, tagged or not, and their descendants), up to ``grace_s`` for them to
    exit, then SIGKILL. For the crash handler, after the leader died: while the leader
    still runs this does nothing (use ``stop``), nor when its pid now belongs to another
    process. Without a create time only tagged processes are swept. Returns the number
    of processes signalled (0: nothing was left).
    """
    reap_children()
    leader, may_have_members = process_tree.resolve_leader(pid, create_time)
    if leader is not None or not may_have_members:
        return 0
    return _sweep(pid, create_time, engine_id, grace_s)[0]


def stop_left_behind(engine_id: str, pid: int, create_time: float, grace_s: float) -> None:
    """Stop ``pid``, a process tagged ``engine_id`` that is not a session leader: a
    worker whose leader (the process ``spawn`` started) is dead. It is no engine: it
    cannot serve, and adopting it would leave its engine waiting on a process that
    never answers. Stops it and what runs below it, then the other tagged processes of
    its session (the dead leader's session: no process joins a session it was not
    forked into)."""
    try:
        sid = os.getsid(pid)
    except OSError:
        return  # gone already
    stop(pid, create_time, grace_s, engine_id=engine_id)
    if sid != pid:
        sweep_session(sid, None, grace_s, engine_id=engine_id)


def find_engine_leader(engine_id: str, grace_s: float) -> TaggedProcess | None:
    """The live session leader tagged ``engine_id`` (an engine ``spawn`` started), after
    stopping what dead leaders of it left behind (``stop_left_behind``); None when
    there is none."""
    for _ in range(4):  # each pass stops one orphan (and its session's tagged ones)
        found = find_tagged_processes().get(engine_id)
        if found is None or found.session_leader:
            return found
        stop_left_behind(engine_id, found.pid, found.create_time, grace_s)
    return None


def _sweep(
    pid: int, create_time: float | None, engine_id: str | None, grace_s: float
) -> tuple[int, bool]:
    """Terminate, then kill, the tree of gone leader ``pid``: (processes signalled,
    whether SIGKILL was needed)."""
    leftovers = process_tree.tree(pid, create_time, engine_id, None)
    if not leftovers:
        return 0, False
    _signal_each(leftovers, signal.SIGTERM)
    alive = _wait_gone(leftovers, grace_s)
    if alive:
        _signal_each(alive, signal.SIGKILL)
        _wait_gone(alive, _KILL_WAIT_S)
    return len(leftovers), bool(alive)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _describe(proc: psutil.Process) -> str:
    try:
        return shlex.join(proc.cmdline()[:4]) or proc.name()
    except psutil.Error:
        return "?"


# ---------------------------------------------------------------------------- finding


def find_tagged_processes() -> dict[str, TaggedProcess]:
    """Engines running on this host, by engine id: for each ``SAGELLM_ENGINE_ID`` seen,
    its top process (the session leader ``spawn`` made; else the topmost tagged
    ancestor, e.g. a worker orphaned by its leader's crash). Processes whose environment
    cannot be read (other users') and zombies are skipped; untagged processes are never
    returned, nor those renamed by ``setproctitle`` (their tag no longer reads): for an
    engine whose leader is known, ``engine_tree`` finds them. One scan of the process
    table."""
    tagged: dict[int, tuple[str, psutil.Process, dict[str, Any]]] = {}
    for proc in _maybe_tagged():
        try:
            info = proc.as_dict(["pid", "ppid", "create_time", "cmdline", "status"])
        except psutil.Error:
            continue
        if info.get("status") == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        tag = process_tree.tag_of(proc)
        if tag is not None:
            tagged[proc.pid] = (tag, proc, info)

    best: dict[str, tuple[tuple[bool, float], TaggedProcess]] = {}
    for pid, (tag, _proc, info) in tagged.items():
        parent = tagged.get(int(info.get("ppid") or 0))
        if parent is not None and parent[0] == tag:
            continue  # not the top of its engine
        try:
            leader = os.getsid(pid) == pid
        except OSError:
            continue
        create_time = float(info.get("create_time") or 0.0)
        found = TaggedProcess(
            engine_id=tag,
            pid=pid,
            create_time=create_time,
            cmdline=tuple(info.get("cmdline") or ()),
            session_leader=leader,
        )
        rank = (not leader, create_time)  # session leader first, then the oldest
        if tag not in best or rank < best[tag][0]:
            best[tag] = (rank, found)
    return {tag: found for tag, (_, found) in best.items()}


_TAG = b"\0" + ENGINE_ID_ENV.encode() + b"="
_SETTLE_S = 1.0  # as process_tree.tag_of: a younger process may still be exec'ing


def _own_marks() -> list[bytes]:
    """What the environment of a fork of this worker carries until it execs its engine
    (this process's own host name and data directory settings)."""
    return [
        f"\0{name}={os.environ[name]}\0".encode()
        for name in ("SAGELLM_HOST_NAME", "SAGELLM_DATA_DIR")
        if name in os.environ
    ]


def _maybe_tagged() -> list[psutil.Process]:
    """The processes whose tag ``find_tagged_processes`` must read: where ``/proc`` is
    readable, those whose raw environment carries the tag, and young ones with this
    worker's own environment (a fork of a worker of this host that has not exec'd its
    engine yet, which ``tag_of`` waits for). Reading each environment raw is far
    cheaper than psutil's full look at every process of a busy host, and no young
    process that is not ours costs ``tag_of``'s settling wait. Elsewhere, every
    process."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return list(psutil.process_iter())
    marks = _own_marks()
    now = time.time()
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = b"\0" + f.read() + b"\0"
        except OSError:  # gone, or another user's
            continue
        tagged = _TAG in env
        if not tagged and not (marks and all(m in env for m in marks)):
            continue
        try:
            proc = psutil.Process(pid)
            if not tagged and now - proc.create_time() > _SETTLE_S:
                continue  # a control-plane process of this host (a worker), settled
        except psutil.Error:
            continue
        out.append(proc)
    return out


def _listening_ports(proc: psutil.Process) -> tuple[int, ...]:
    try:
        conns = proc.net_connections(kind="inet")
    except psutil.Error:
        return ()
    return tuple(sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}))


# ---------------------------------------------------------------------------- logs


def tail_log(path: Path, lines: int = 40, *, max_bytes: int = 1 << 20) -> str:
    """The last ``lines`` lines of ``path`` (read backwards from the end, at most
    ``max_bytes``); "" when the file does not exist."""
    if lines <= 0:
        return ""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return ""
    with f:
        pos = f.seek(0, os.SEEK_END)
        data = b""
        # lines + 1 newlines guarantee `lines` complete lines before a trailing newline.
        while pos > 0 and data.count(b"\n") <= lines and len(data) < max_bytes:
            step = min(8192, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    return "\n".join(text.split("\n")[-lines:])
