"""/v1/management: status, gpus, hosts, backends, tasks.

The status views read the cluster with ``Registry.snapshot``: one Redis round trip
(one atomic script) whatever the number of engines, which brings only the records
written since this process last read them (``app.state.snapshot``); records are sent as
Redis stores them, and what a view encodes from an unchanged read is sent again as it
is (``app.api.documents``). Each view's docstring states its cost per engine.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api import documents
from app.api.context import cluster
from app.api.schemas import EngineSchema, TaskSchema
from app.core import status as views
from app.core.gpus import GpuCapacity
from app.core.models import HostRecord
from app.state.ledger import Reservation

blp = Blueprint(
    "cluster",
    __name__,
    url_prefix="/v1/management",
    description="Cluster state: hosts, GPUs, engines, routing, tasks",
)


class GpuSchema(ma.Schema):
    host = ma.fields.String()
    host_up = ma.fields.Boolean()
    index = ma.fields.Integer()
    uuid = ma.fields.String()
    name = ma.fields.String()
    total_mib = ma.fields.Integer()
    free_mib = ma.fields.Integer()
    outside_mib = ma.fields.Integer()
    reserved_mib = ma.fields.Integer()
    available_mib = ma.fields.Integer()
    total_gb = ma.fields.Float()
    outside_gb = ma.fields.Float()
    reserved_gb = ma.fields.Float()
    available_gb = ma.fields.Float()
    utilization_pct = ma.fields.Integer(allow_none=True)


class HostSchema(ma.Schema):
    name = ma.fields.String()
    address = ma.fields.String()
    up = ma.fields.Boolean()
    heartbeat_age_s = ma.fields.Float()
    gpu_count = ma.fields.Integer()
    gpu_source = ma.fields.String()
    engines = ma.fields.List(ma.fields.String())
    port_range = ma.fields.List(ma.fields.Integer())
    busy_ports = ma.fields.List(ma.fields.Integer())
    worker_version = ma.fields.String()


class BackendSchema(ma.Schema):
    engine_id = ma.fields.String()
    model = ma.fields.String()
    served_model_name = ma.fields.String()
    label = ma.fields.String(allow_none=True)
    base_url = ma.fields.String()
    host = ma.fields.String(allow_none=True)
    external = ma.fields.Boolean(
        metadata={"description": "a registered endpoint sagellm did not start (host null)"}
    )
    healthy = ma.fields.Boolean()
    in_flight = ma.fields.Integer()


class BackendsSchema(ma.Schema):
    llm_backends = ma.fields.List(ma.fields.Nested(BackendSchema))
    embedding_backends = ma.fields.List(ma.fields.Nested(BackendSchema))


class ReservationSchema(ma.Schema):
    engine_id = ma.fields.String()
    host = ma.fields.String()
    port = ma.fields.Integer()
    gpus = ma.fields.List(ma.fields.Dict())


class StatusSchema(ma.Schema):
    hosts = ma.fields.List(ma.fields.Nested(HostSchema))
    gpus = ma.fields.List(ma.fields.Nested(GpuSchema))
    engines = ma.fields.List(ma.fields.Nested(EngineSchema))
    reservations = ma.fields.List(ma.fields.Nested(ReservationSchema))
    counts = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Integer())


def _gpus(hosts: list[HostRecord], caps: dict[str, list[GpuCapacity]]) -> list[dict[str, Any]]:
    return views.gpu_rows(hosts, caps, cluster().settings.gpu_safety_margin_mib)


def in_flight_counts() -> dict[str, int]:
    from flask import current_app

    counter = current_app.extensions.get("sagellm.in_flight")
    return dict(counter()) if callable(counter) else {}


def _reservation_rows(held: list[Reservation]) -> list[dict[str, Any]]:
    return [
        {
            "engine_id": res.engine_id,
            "host": res.host,
            "port": res.port,
            "gpus": [{"uuid": u, "memory_mib": m} for u, m in res.gpus],
        }
        for res in held
    ]


# Encoded once per change: a status read returns the same list objects until a record
# or a reservation in them was written (``app.state.snapshot``).
_engines_json = documents.EncodedOnce(documents.joined)
_counts_json = documents.EncodedOnce(
    lambda docs: documents.encode(views.state_counts(d.state for d in docs))
)
_reservations_json = documents.EncodedOnce(lambda held: documents.encode(_reservation_rows(held)))
_gpus_json = documents.EncodedOnce(lambda hosts, caps: documents.encode(_gpus(hosts, caps)))
_backends_json = documents.EncodedOnce(
    lambda docs, counts: documents.encode(views.backend_rows((d.doc for d in docs), dict(counts)))
)


@blp.route("/status")
class Status(MethodView):
    @blp.response(200, StatusSchema)
    def get(self) -> Response:
        """Hosts (up/down, heartbeat age), GPUs, engines and reservations.

        Cost: one Redis round trip (one atomic script) whatever the size of the
        cluster. Per engine: the bytes of its id; and only for the records written
        since this API process last read them, the bytes of the record and one decode;
        the engines, their counts and the reservations are encoded again only when one
        of them changed. Per host and GPU, one row."""
        snap = cluster().registry.snapshot(capacity=True, reservations=True)
        return documents.json_object(
            [
                ("engines", _engines_json(snap.engines)),
                ("hosts", documents.encode(views.host_rows(snap.hosts))),
                ("gpus", _gpus_json(snap.hosts, snap.capacity)),
                ("reservations", _reservations_json(snap.reservations)),
                ("counts", _counts_json(snap.engines)),
            ]
        )


@blp.route("/gpus")
class Gpus(MethodView):
    @blp.response(200, GpuSchema(many=True))
    def get(self) -> Response:
        """Every GPU: total, held by outside processes, reserved, available.

        Cost: one Redis round trip; nothing per engine; per GPU, one row, built again
        only when a heartbeat or a reservation changed what it shows."""
        snap = cluster().registry.snapshot(engines=False, capacity=True)
        return documents.json_response(_gpus_json(snap.hosts, snap.capacity))


@blp.route("/hosts")
class Hosts(MethodView):
    @blp.response(200, HostSchema(many=True))
    def get(self) -> list[dict[str, Any]]:
        """Hosts known to the cluster; ``up`` is false once the heartbeat expired.

        Cost: two Redis round trips; nothing per engine."""
        return views.host_rows(cluster().registry.hosts())


class ForgottenSchema(ma.Schema):
    host = ma.fields.String()
    engines = ma.fields.List(ma.fields.String())


@blp.route("/hosts/<name>")
class HostOne(MethodView):
    @blp.response(200, ForgottenSchema)
    @blp.doc(
        responses={"404": {"description": "Unknown host"}, "409": {"description": "The host is up"}}
    )
    def delete(self, name: str) -> dict[str, Any]:
        """Forget a DOWN host: its engines end FAILED, their reservations are released."""
        from app.services.hosts import forget_host

        return {"host": name, "engines": forget_host(cluster(), name)}


@blp.route("/backends")
class Backends(MethodView):
    @blp.response(200, BackendsSchema)
    def get(self) -> Response:
        """Engines the gateway can route to, by kind, with in-flight request counts.

        Cost: the status read (one Redis round trip; per engine the bytes of its id,
        and of its record only when it was written since this process last read it)
        and the gateways' in-flight counts (a SCAN that steps over every key, a few per
        engine, a thousand per round trip); the rows are built again only when a
        record or a count changed."""
        snap = cluster().registry.snapshot()
        counts = tuple(sorted(in_flight_counts().items()))
        return documents.json_response(_backends_json(snap.engines, counts))


@blp.route("/tasks/<task_id>")
class Task(MethodView):
    @blp.response(200, TaskSchema)
    def get(self, task_id: str) -> dict[str, Any]:
        """A Celery task's state (PENDING also means unknown), result or error."""
        result = cluster().celery.AsyncResult(task_id)
        state = str(result.state)
        info = result.info
        out: dict[str, Any] = {
            "id": task_id,
            "state": state,
            "name": getattr(result, "name", None),
            "ready": result.ready(),
            "result": None,
            "error": None,
            "progress": None,
        }
        if state == "SUCCESS":
            out["result"] = info
        elif state in ("FAILURE", "REVOKED"):
            out["error"] = repr(info)
        elif isinstance(info, dict):
            out["progress"] = info
        return out
