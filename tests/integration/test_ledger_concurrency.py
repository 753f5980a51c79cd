"""Acceptance: 8 processes x 25 threads reserving at once on a real redis-server.

2 mock hosts x 2 GPUs x 80 GB. A sampler takes atomic snapshots (MULTI) of the whole
ledger while the workers run and checks reserved + outside + margin <= total on every
GPU in every snapshot. A witness key per (host, port), taken with SET NX right after a
grant and dropped right before the release, proves no port is ever held by two
engines at once. Every refusal must say why.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import re
import threading

import pytest
import redis

from app.core.errors import ReservationConflict
from app.core.gpus import GpuCapacity
from app.dev.redis_server import RedisProcess
from app.state import keys
from app.state.client import connect
from app.state.ledger import Ledger

pytestmark = pytest.mark.integration

GB = 1024
HOSTS = ("a", "b")
GPUS = 2
TOTAL_MIB = 80 * GB
OUTSIDE_MIB = {("a", 0): 5 * GB, ("a", 1): 0, ("b", 0): 0, ("b", 1): 12 * GB}
MARGIN_MIB = GB
PORT_RANGE = (8100, 8159)
PROCS, THREADS, ROUNDS = 8, 25, 6
REASON = re.compile(
    r"^(host [ab], GPU \d: \d+\.\d GB free, \d+\.\d GB needed"
    r"|host [ab]: no free port in \d+-\d+)$"
)


def _uuid(host: str, i: int) -> str:
    return f"GPU-{host}{i}"


def _worker(url: str, proc_no: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    client = connect(url)
    ledger = Ledger(client)
    stats = {"granted": 0, "refused": 0, "bad_reasons": [], "double_ports": []}
    lock = threading.Lock()

    def run(thread_no: int) -> None:
        rng = random.Random(proc_no * 1000 + thread_no)
        held: list[tuple[str, str, int]] = []
        for r in range(ROUNDS):
            eid = f"p{proc_no}-t{thread_no}-r{r}"
            host = rng.choice(HOSTS)
            n = rng.choice((0, 1, 1, 2))
            gpus = [(_uuid(host, i), rng.randint(1, 40) * GB) for i in rng.sample(range(GPUS), n)]
            try:
                res = ledger.reserve(eid, host, gpus, port_range=PORT_RANGE, margin_mib=MARGIN_MIB)
            except ReservationConflict as exc:
                with lock:
                    stats["refused"] += 1  # type: ignore[operator]
                    if not REASON.match(exc.message):
                        stats["bad_reasons"].append(exc.message)  # type: ignore[attr-defined]
                continue
            witness = f"test:witness:{host}:{res.port}"
            if not client.set(witness, eid, nx=True):
                with lock:
                    stats["double_ports"].append((host, res.port, eid))  # type: ignore[attr-defined]
            with lock:
                stats["granted"] += 1  # type: ignore[operator]
            held.append((eid, witness, res.port))
            if rng.random() < 0.5 and held:
                eid2, witness2, _ = held.pop(rng.randrange(len(held)))
                client.delete(witness2)
                assert ledger.release(eid2)
        for eid2, witness2, _ in held:
            client.delete(witness2)
            assert ledger.release(eid2)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(stats)


def _snapshot_violations(client: redis.Redis) -> list[str]:
    """One atomic snapshot of every GPU's reservations; the over-commits it shows."""
    pipe = client.pipeline(transaction=True)
    for host in HOSTS:
        for i in range(GPUS):
            pipe.hvals(keys.gpu_reservations(host, _uuid(host, i)))
    sums = [sum(int(v) for v in vals) for vals in pipe.execute()]
    bad = []
    for k, (host, i) in enumerate((h, i) for h in HOSTS for i in range(GPUS)):
        used = sums[k] + OUTSIDE_MIB[(host, i)] + MARGIN_MIB
        if used > TOTAL_MIB:
            bad.append(f"{host}/{i}: {used} MiB > {TOTAL_MIB}")
    return bad


def test_many_processes_and_threads_never_overcommit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = RedisProcess(tmp_path, persist=False).start()
    try:
        client = connect(server.url)
        ledger = Ledger(client)
        for host in HOSTS:
            ledger.publish_capacity(
                host,
                [
                    GpuCapacity(host, i, _uuid(host, i), TOTAL_MIB, OUTSIDE_MIB[(host, i)])
                    for i in range(GPUS)
                ],
            )
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [ctx.Process(target=_worker, args=(server.url, p, out)) for p in range(PROCS)]
        stop = threading.Event()
        violations: list[str] = []
        snapshots = 0
        max_reserved = 0

        def sample() -> None:
            nonlocal snapshots, max_reserved
            while not stop.is_set():
                violations.extend(_snapshot_violations(client))
                snapshots += 1
                total = sum(g.reserved_mib for h in HOSTS for g in ledger.capacity(h))
                max_reserved = max(max_reserved, total)

        sampler = threading.Thread(target=sample)
        sampler.start()
        for p in procs:
            p.start()
        results = [out.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        stop.set()
        sampler.join()

        granted = sum(r["granted"] for r in results)
        refused = sum(r["refused"] for r in results)
        assert granted + refused == PROCS * THREADS * ROUNDS
        assert granted > 0 and refused > 0, "the test must exercise both outcomes"
        assert snapshots > 10 and max_reserved > 0
        assert violations == []
        assert [r for x in results for r in x["double_ports"]] == []
        assert [r for x in results for r in x["bad_reasons"]] == []
        assert ledger.is_empty()
        assert all(g.reserved_mib == 0 for h in HOSTS for g in ledger.capacity(h))
        assert not client.keys("test:witness:*")
        print(
            json.dumps(
                {
                    "granted": granted,
                    "refused": refused,
                    "snapshots": snapshots,
                    "max_reserved_gb": max_reserved / GB,
                }
            )
        )
    finally:
        server.stop()
