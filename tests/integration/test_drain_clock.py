"""A drain compares write numbers, not clocks: a gateway process whose clock is a minute
behind or ahead of the API's is counted as knowing of a drain exactly once it has heard
the write that began it. The real gateway of a process (``make_gateway``: discovery,
change feed, its traffic report) and the worker's drain check, on a real redis-server;
only the gateway's clock is skewed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import redis

from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.dev.redis_server import RedisProcess
from app.gateway.routes import Gateway, make_gateway
from app.settings import Settings
from app.state.client import connect
from app.state.gateway_report import GatewayReports
from app.state.registry import Registry
from tests.integration.harness import wait_until
from workers.agent import drain
from workers.agent.context import HostContext, build_context

pytestmark = pytest.mark.integration
S = EngineState
EID = "eng-drained"


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server of this module's own: the gateway processes of other tests' apps
    (still reporting in this pytest process) are not among its reports."""
    server = RedisProcess(tmp_path_factory.mktemp("drain-clock"), persist=False).start()
    yield server
    server.stop()


@pytest.fixture
def real_redis(own_redis: RedisProcess) -> Iterator[redis.Redis]:
    client = connect(own_redis.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def ctx(own_redis: RedisProcess, real_redis: redis.Redis, tmp_path: Path) -> HostContext:
    """The draining engine's host's worker context (the drain check's)."""
    settings = Settings.from_env(
        {
            "SAGELLM_REDIS_URL": own_redis.url,
            "SAGELLM_HOST_NAME": "a",
            "SAGELLM_DATA_DIR": str(tmp_path / "data"),
            "SAGELLM_MOCK_GPUS": "1x80",
        }
    )
    return build_context(settings, None)  # type: ignore[arg-type]


@pytest.fixture
def skewed_gateway(
    request: pytest.FixtureRequest, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Gateway]:
    """One gateway process's routing and traffic report, its clock ``request.param``
    seconds off the API's and the worker's."""
    skew = float(request.param)
    clock = SimpleNamespace(
        time=lambda: time.time() + skew,
        monotonic=time.monotonic,
        sleep=time.sleep,
        perf_counter=time.perf_counter,
    )
    for module in ("app.gateway.discovery", "app.state.gateway_report"):
        monkeypatch.setattr(f"{module}.time", clock)
    gateway = make_gateway(Registry(real_redis).engines, "round_robin", 10, 1.0, real_redis)
    yield gateway


def _serving_engine(r: redis.Redis) -> EngineRecord:
    """A RUNNING engine whose process is alive (this one: the check looks)."""
    rec = EngineRecord(
        id=EID,
        spec=EngineSpec(model="org/m", served_model_name="m"),
        state=S.RUNNING,
        host="a",
        address="127.0.0.1",
        port=18451,
        pid=os.getpid(),
        process_create_time=psutil.Process().create_time(),
        last_health_at=time.time(),
    )
    return Registry(r).create(rec)


def _report(gateway: Gateway, reports: GatewayReports) -> None:
    reports.write(gateway.traffic.process_id, gateway.traffic.report())


@pytest.mark.parametrize("skewed_gateway", [-60.0, 60.0], indirect=True, ids=["behind", "ahead"])
def test_a_gateway_knows_of_a_drain_once_it_heard_it_whatever_its_clock(
    ctx: HostContext, real_redis: redis.Redis, skewed_gateway: Gateway
) -> None:
    gateway, reports, registry = skewed_gateway, GatewayReports(real_redis), Registry(real_redis)
    _serving_engine(real_redis)
    assert [b.engine_id for b in gateway.directory.backends()] == [EID]
    wait_until(lambda: gateway.directory._feed.up, 10, what="the gateway's subscription")  # type: ignore[union-attr]
    _report(gateway, reports)  # what it knows before the drain

    # The API's drain: one write, stamped by Redis, not by anyone's clock.
    rec = registry.update(EID, lambda r: r.start_drain(time.time() + 30))
    assert rec.state is S.DRAINING
    early = drain.check(ctx, rec, reports, time.time())
    # Its last report was made before the drain: whatever its clock said then, it may
    # still send the engine a request. Not drained.
    assert early.outcome is None and early.behind == 1, early

    def counted_as_knowing() -> bool:
        gateway.directory.backends()  # it routes now and then
        _report(gateway, reports)
        return drain.check(ctx, registry.get(EID), reports, time.time()).outcome is not None

    # Once it heard the write (milliseconds), it is counted as knowing, and indeed it
    # sends the engine nothing new.
    wait_until(counted_as_knowing, 3, what="the gateway counted as knowing of the drain")
    assert (
        drain.check(ctx, registry.get(EID), reports, time.time()).outcome is drain.Outcome.DRAINED
    )
    assert EID not in [b.engine_id for b in gateway.directory.backends()]
