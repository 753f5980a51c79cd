"""Redis write faults for the fault-injection tests (issue 10).

``FaultInjector.wrap(client)`` patches one ``redis.Redis`` instance so that every
command it sends goes through the injector: reads pass; each *write* (by command name:
SET, HSET, DEL, EVALSHA, ...; a pipeline counts once, as one write, when any of its
queued commands writes) is counted, and the ``fail_at``-th one (0-based, counted from
``arm()``) raises ``InjectedFault`` (a ``redis.ConnectionError``):

* ``mode="before"``: the write is never sent (the connection broke on the way);
* ``mode="after"``: the write is executed, then the caller sees the error (the reply
  was lost).

Every path to the server goes through the two patched entry points:
``Redis.execute_command`` (plain commands; ``Script`` objects call ``client.evalsha``,
which calls ``self.execute_command``) and ``Pipeline.execute`` of the pipelines that
``client.pipeline()`` (and ``client.transaction()``) returns.

``wrap_context`` wraps the one client a worker's ``HostContext`` holds (registry,
ledger and their ``Committer`` scripts share it) and checks that no other is held.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import redis

from workers.agent.context import HostContext

T = TypeVar("T")
Mode = Literal["before", "after"]

# Commands that change data. Anything else (GET, MGET, HGETALL, SMEMBERS, SCAN,
# EXISTS, TYPE, SCRIPT LOAD, PING, ...) is a read and is never failed.
WRITE_COMMANDS = frozenset(
    {
        "APPEND",
        "BLMOVE",
        "BLPOP",
        "BRPOP",
        "BRPOPLPUSH",
        "COPY",
        "DECR",
        "DECRBY",
        "DEL",
        "EVAL",
        "EVALSHA",
        "EXEC",
        "EXPIRE",
        "EXPIREAT",
        "FCALL",
        "FLUSHALL",
        "FLUSHDB",
        "GETDEL",
        "GETEX",
        "GETSET",
        "HDEL",
        "HINCRBY",
        "HINCRBYFLOAT",
        "HMSET",
        "HSET",
        "HSETNX",
        "INCR",
        "INCRBY",
        "INCRBYFLOAT",
        "LINSERT",
        "LMOVE",
        "LPOP",
        "LPUSH",
        "LPUSHX",
        "LREM",
        "LSET",
        "LTRIM",
        "MOVE",
        "MSET",
        "MSETNX",
        "MULTI",
        "PERSIST",
        "PEXPIRE",
        "PEXPIREAT",
        "PSETEX",
        "RENAME",
        "RENAMENX",
        "RESTORE",
        "RPOP",
        "RPOPLPUSH",
        "RPUSH",
        "RPUSHX",
        "SADD",
        "SET",
        "SETEX",
        "SETNX",
        "SETRANGE",
        "SINTERSTORE",
        "SDIFFSTORE",
        "SMOVE",
        "SPOP",
        "SREM",
        "SUNIONSTORE",
        "UNLINK",
        "XADD",
        "XDEL",
        "XTRIM",
        "ZADD",
        "ZINCRBY",
        "ZPOPMAX",
        "ZPOPMIN",
        "ZREM",
        "ZREMRANGEBYRANK",
        "ZREMRANGEBYSCORE",
    }
)


class InjectedFault(redis.ConnectionError):
    """The connection error the injector raises at the chosen write."""


def command_name(arg: object) -> str:
    name = arg.decode() if isinstance(arg, bytes) else str(arg)
    return name.split(" ", 1)[0].upper()


def is_write(name: str) -> bool:
    return command_name(name) in WRITE_COMMANDS


def describe(args: tuple[Any, ...]) -> str:
    """A short, stable label for a write: the command, and for our ledger script the
    operation (``commit:create``, ``commit:update+release``, ...)."""
    name = command_name(args[0])
    if name in ("EVALSHA", "EVAL") and len(args) > 2:
        argv = args[3 + int(args[2]) :]
        op = _json(argv[0]) if argv else None
        if not isinstance(op, dict) or "mode" not in op:
            return "publish_capacity" if int(args[2]) == 2 else name
        label = f"commit:{op['mode']}"
        record = _json(argv[2]) if len(argv) > 2 else None
        if isinstance(record, dict) and "state" in record:
            label += f" {record['state']}"
        if "reserve" in op:
            label += " +reserve"
        if op.get("release"):
            label += " +release"
        return label
    if name in ("SET", "HSET", "DEL", "SADD", "SREM", "HDEL", "EXPIRE") and len(args) > 1:
        key = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
        return f"{name} {key}"
    return name


def _json(raw: object) -> Any:
    try:
        return json.loads(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@dataclass
class FaultInjector:
    """Counts the writes of wrapped clients; fails the ``fail_at``-th after ``arm``."""

    fail_at: int | None = None
    mode: Mode = "before"
    armed: bool = False
    writes: list[str] = field(default_factory=list)  # labels of the writes since arm()
    fired: str | None = None  # label of the write that was failed

    def arm(self, fail_at: int | None, mode: Mode = "before") -> None:
        """Start counting writes from 0; fail the ``fail_at``-th (None: a dry run)."""
        self.fail_at, self.mode, self.armed = fail_at, mode, True
        self.writes, self.fired = [], None

    def disarm(self) -> None:
        self.armed = False

    def _write(self, label: str, send: Callable[[], T]) -> T:
        if not self.armed:
            return send()
        index = len(self.writes)
        if index == self.fail_at and self.mode == "before":
            self.writes.append(label)
            self.fired = label
            raise InjectedFault(f"injected: connection lost before write #{index} ({label})")
        try:
            result = send()
        except redis.exceptions.NoScriptError:
            # Not executed: ``Script`` loads the script and sends the same write again,
            # which is counted (and failed, if chosen) then.
            raise
        self.writes.append(label)
        if index != self.fail_at:
            return result
        self.fired = label
        raise InjectedFault(f"injected: reply lost after write #{index} ({label})")

    # ------------------------------------------------------------------ wrapping
    def wrap(self, client: redis.Redis) -> redis.Redis:
        """Route ``client``'s commands and pipelines through this injector (in place)."""
        if getattr(client, "_fault_injector", None) is self:
            return client
        assert not hasattr(client, "_fault_injector"), "client wrapped by another injector"
        send_command = client.execute_command
        make_pipeline = client.pipeline

        def execute_command(*args: Any, **options: Any) -> Any:
            if not is_write(args[0]):
                return send_command(*args, **options)
            return self._write(describe(args), lambda: send_command(*args, **options))

        def pipeline(transaction: bool = True, shard_hint: Any = None) -> Any:
            pipe = make_pipeline(transaction, shard_hint)
            run = pipe.execute

            def execute(raise_on_error: bool = True) -> Any:
                labels = [describe(tuple(args)) for args, _ in pipe.command_stack]
                if not any(is_write(label) for label in labels):
                    return run(raise_on_error)
                kind = "MULTI" if transaction else "PIPELINE"
                return self._write(f"{kind}[{', '.join(labels)}]", lambda: run(raise_on_error))

            pipe.execute = execute  # type: ignore[method-assign]
            return pipe

        client.execute_command = execute_command  # type: ignore[method-assign]
        client.pipeline = pipeline  # type: ignore[method-assign]
        client._fault_injector = self  # type: ignore[attr-defined]
        return client

    def wrap_context(self, ctx: HostContext) -> HostContext:
        """Wrap the client a worker's context uses; fails if it holds more than one."""
        client = ctx.registry.r
        held = {
            "ledger": ctx.ledger.r,
            "registry committer": ctx.registry._commit.client,
            "ledger committer": ctx.ledger.commit.client,
            "commit script": ctx.ledger.commit._script.registered_client,
            "publish script": ctx.ledger._publish.registered_client,
        }
        for name, other in held.items():
            assert other is client, f"{name} holds another Redis client: wrap it too"
        self.wrap(client)
        return ctx
