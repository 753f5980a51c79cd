"""What the status views read from Redis (``app.state.snapshot``): the records written
since the API process last read them, nothing more; and what they answer is what Redis
holds after any sequence of writes, including writes of another version and a Redis
that lost everything. Real redis-server, the API in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from flask.testing import FlaskClient

from app.core.models import EngineState
from app.dev.redis_server import RedisProcess
from app.state import keys
from app.state.ledger import Ledger
from app.state.registry import Registry
from tests.integration.test_api import add_host
from tests.integration.test_api import api as api  # the fixture
from tests.integration.test_engine_changes import new_engine

pytestmark = pytest.mark.integration
S = EngineState
M = "/v1/management"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server of this module's own: what it sends is what these tests' API
    reads (the apps of other tests in this pytest process still publish in-flight
    counts to theirs, which ``/backends`` reads)."""
    server = RedisProcess(tmp_path_factory.mktemp("status-reads"), persist=False).start()
    yield server
    server.stop()


def redis_bytes_out(r: redis.Redis) -> int:
    """Bytes redis-server has sent to all its clients so far."""
    return int(r.info("stats")["total_net_output_bytes"])


def bytes_read_by(api: FlaskClient, r: redis.Redis, path: str) -> int:
    """Bytes Redis sent while the API answered ``path`` (and one INFO reply)."""
    before = redis_bytes_out(r)
    assert api.get(path).status_code == 200
    return redis_bytes_out(r) - before


def record_bytes(r: redis.Redis) -> int:
    return sum(len(r.get(keys.engine(e.id)) or b"") for e in Registry(r).engines())


@pytest.mark.parametrize("path", ["/status", "/engines", "/backends"])
def test_an_unchanged_cluster_is_answered_without_reading_its_records_again(
    api: FlaskClient,
    real_redis: redis.Redis,
    path: str,
) -> None:
    add_host(real_redis, "a", "8x80")
    ids = [new_engine(real_redis, f"eng-{i:02d}").id for i in range(40)]
    one_record = record_bytes(real_redis) // 40
    first = bytes_read_by(api, real_redis, M + path)
    assert first > 40 * one_record  # the first read brings every record
    again = bytes_read_by(api, real_redis, M + path)
    assert again < 8 * one_record, (again, one_record)
    Registry(real_redis).update(ids[7], lambda r: r.transition(S.STARTING))
    after_one = bytes_read_by(api, real_redis, M + path)
    assert after_one < 9 * one_record, (after_one, one_record)
    body = api.get(M + path).json
    if path != "/backends":
        engines = body if path == "/engines" else body["engines"]
        assert [e["state"] for e in engines].count("STARTING") == 1


def _status_matches_redis(api: FlaskClient, r: redis.Redis) -> None:
    body = api.get(f"{M}/status").json
    reg = Registry(r)
    assert body["engines"] == [e.to_dict() for e in reg.engines()]
    led = Ledger(r)
    held = {e: led.reservation(e) for e in led.reserved_engines()}
    assert {x["engine_id"]: (x["host"], x["port"]) for x in body["reservations"]} == {
        e: (res.host, res.port) for e, res in held.items() if res is not None
    }
    counts: dict[str, int] = {}
    for e in reg.engines():
        counts[e.state.value] = counts.get(e.state.value, 0) + 1
    assert body["counts"] == counts
    listed = api.get(f"{M}/engines").json
    assert listed == body["engines"]


def test_status_shows_every_write_made_between_two_reads(
    api: FlaskClient,
    real_redis: redis.Redis,
) -> None:
    add_host(real_redis, "a", "4x80")
    reg = Registry(real_redis)
    a, b, c = (new_engine(real_redis, f"eng-{x}").id for x in "abc")
    _status_matches_redis(api, real_redis)
    reg.update(a, lambda r: r.transition(S.STARTING))  # a record
    _status_matches_redis(api, real_redis)
    reg.update(b, lambda r: r.request_stop())  # record and reservation (released)
    reg.delete(c)  # gone
    _status_matches_redis(api, real_redis)
    new_engine(real_redis, "eng-d")  # a new one, with its room
    _status_matches_redis(api, real_redis)


def test_after_redis_lost_everything_status_shows_what_is_there_now(
    api: FlaskClient,
    real_redis: redis.Redis,
) -> None:
    add_host(real_redis, "a", "4x80")
    for x in "abc":
        new_engine(real_redis, f"eng-{x}")
    _status_matches_redis(api, real_redis)
    real_redis.flushall()
    _status_matches_redis(api, real_redis)
    add_host(real_redis, "a", "4x80")
    new_engine(real_redis, "eng-b", model="other")  # the same id, another record
    _status_matches_redis(api, real_redis)
    assert api.get(f"{M}/status").json["engines"][0]["spec"]["model"] == "other"


def test_a_record_written_by_another_version_is_read_every_time(
    api: FlaskClient,
    real_redis: redis.Redis,
) -> None:
    add_host(real_redis, "a", "4x80")
    new_engine(real_redis, "eng-a")
    # A writer that does not number its writes (an older worker during an upgrade).
    old = new_engine(real_redis, "eng-old").to_dict()
    real_redis.zrem(keys.RECORD_SEQS, "eng-old")
    _status_matches_redis(api, real_redis)
    old["restart_count"] = 7
    real_redis.set(keys.engine("eng-old"), json.dumps(old))
    body = api.get(f"{M}/status").json
    assert {e["id"]: e["restart_count"] for e in body["engines"]}["eng-old"] == 7
