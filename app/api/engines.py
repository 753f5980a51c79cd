"""/v1/management/engines: start, register (external), list, show, stop, restart, logs,
prune."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api import documents
from app.api.context import cluster
from app.api.schemas import (
    LONG_POLL_DEFAULT_S,
    SEQ_HEADER,
    SEQ_HEADER_DOC,
    EngineAcceptedSchema,
    EngineCreateSchema,
    EngineEventsSchema,
    EngineListArgsSchema,
    EngineReadArgsSchema,
    EngineRegisterSchema,
    EngineSchema,
    LogArgsSchema,
    LogsSchema,
    PruneArgsSchema,
    PrunedSchema,
    WaitArgsSchema,
)
from app.core.errors import NotFoundError, SagellmError, StateLostError
from app.core.external import probed
from app.core.models import EngineState
from app.core.spec import EngineKind, EngineSpec
from app.services import external
from app.services.engines import (
    engine_logs,
    restart_engine,
    start_engine,
    stop_engine,
    wait_until_settled,
)
from app.state.prune import prune_records
from app.state.write_seq import wait_for_write

blp = Blueprint(
    "engines",
    __name__,
    url_prefix="/v1/management/engines",
    description="Inference engines: start, inspect, stop",
)
S = EngineState

ERRORS = {
    400: "Invalid input (the message names the field)",
    404: "Unknown engine",
    409: "Nothing fits (reasons per host and GPU), or a conflicting state",
    503: "No worker is alive",
}


class StopArgsSchema(ma.Schema):
    drain = ma.fields.Boolean(
        load_default=True,
        metadata={"description": "Let in-flight requests finish first (DRAINING)"},
    )
    drain_timeout = ma.fields.Float(
        validate=ma.validate.Range(0, 3600),
        metadata={"description": "Seconds the drain may take (default SAGELLM_DRAIN_TIMEOUT_S)"},
    )


class EngineStartFailed(SagellmError):
    status_code = 502


def _doc_errors(*codes: int) -> dict[str, Any]:
    return {"responses": {str(c): {"description": ERRORS[c]} for c in codes}}


@blp.route("")
class Engines(MethodView):
    @blp.arguments(EngineListArgsSchema, location="query")
    @blp.response(200, EngineSchema(many=True), headers=SEQ_HEADER_DOC)
    def get(self, args: dict[str, Any]) -> Response:
        """List engines (filter by state, host, kind, label). The ``X-Sagellm-Seq``
        header is the write number the list is as of; with ``changed_after`` set to it
        the answer waits (long-poll) until a record is written, or ``timeout`` passed.

        Cost: one Redis round trip; per engine, the bytes of its id, and of its record
        only when it was written since this API process last read it (then decoded
        once); the list is sent as stored."""
        c = cluster()
        if "changed_after" in args:
            timeout = args.get("timeout", LONG_POLL_DEFAULT_S)
            wait_for_write(c.registry.r, args["changed_after"], timeout)
        snap = c.registry.snapshot()
        states = {args["state"]} if "state" in args else None
        host, kind, label = args.get("host"), args.get("kind"), args.get("label")
        response = documents.engine_list(
            d for d in snap.engines if d.matches(states, host, kind, label)
        )
        response.headers[SEQ_HEADER] = str(snap.seq)
        return response

    @blp.arguments(EngineCreateSchema)
    @blp.arguments(WaitArgsSchema, location="query")
    @blp.response(202, EngineAcceptedSchema, description="Accepted: the engine is PENDING")
    @blp.alt_response(200, schema=EngineAcceptedSchema, description="wait=true: it is RUNNING")
    @blp.doc(**_doc_errors(400, 409, 503))
    def post(self, start: dict[str, Any], wait: dict[str, Any]) -> Any:
        """Start an engine: place it, reserve GPU memory and a port, queue its start.

        With ``wait=true`` the answer comes when it is RUNNING (200), FAILED (502 with
        the reason), or the timeout passed (202, still starting)."""
        c = cluster()
        spec: EngineSpec = start["spec"]  # read by the one schema (app.core.spec)
        rec = start_engine(c, spec, policy=start["policy"])  # admits it first
        if wait["wait"]:
            try:
                rec = wait_until_settled(c, rec.id, wait["timeout"])
            except NotFoundError:  # only a lost state store removes a starting record
                raise StateLostError(
                    f"engine {rec.id}: the state store lost its record while it was "
                    "starting (Redis was flushed or restarted); retry the request"
                ) from None
            if rec.state is S.FAILED:
                raise EngineStartFailed(f"engine {rec.id} FAILED: {rec.last_error}")
            if rec.state is S.RUNNING:
                return {"engine": rec.to_dict(), "task_id": rec.task_id}, 200
        return {"engine": rec.to_dict(), "task_id": rec.task_id}, 202


@blp.route("/register")
class EngineRegister(MethodView):
    @blp.arguments(EngineRegisterSchema)
    @blp.arguments(WaitArgsSchema, location="query")
    @blp.response(202, EngineSchema, description="Recorded: UNHEALTHY until its first probe")
    @blp.alt_response(200, schema=EngineSchema, description="wait=true: probed")
    @blp.doc(**_doc_errors(400, 409))
    def post(self, body: dict[str, Any], wait: dict[str, Any]) -> Any:
        """Register an external engine: an OpenAI-compatible endpoint sagellm did not
        start (no reservation, no process), routed to by the gateway while its probe
        (``GET <base_url>/v1/models`` listing ``served_model_name``, every health
        interval, on a worker) passes. ``api_key`` is sent to that endpoint only and is
        never answered (``api_key_set``). ``DELETE /engines/{id}`` forgets it.

        With ``wait=true`` the answer comes once it was probed: RUNNING, or UNHEALTHY
        with the reason (200); or when the timeout passed (202)."""
        c = cluster()
        rec = external.register_external(
            c,
            base_url=body["base_url"],
            served_model_name=body["served_model_name"],
            kind=EngineKind(body["kind"]),
            api_key=body.get("api_key"),
        )
        if wait["wait"]:
            rec = external.wait_until_probed(c, rec.id, wait["timeout"])
            if probed(rec):
                return rec.to_dict(), 200
        return rec.to_dict(), 202


@blp.route("/<engine_id>")
class Engine(MethodView):
    @blp.arguments(EngineReadArgsSchema, location="query")
    @blp.response(200, EngineSchema)
    @blp.doc(**_doc_errors(404))
    def get(self, args: dict[str, Any], engine_id: str) -> dict[str, Any]:
        """One engine's record. With ``changed_from`` (the ``updated_at`` of the record
        you have) it is a long-poll: the answer comes as soon as the record is written
        (within milliseconds: the write is announced), else after ``timeout`` seconds
        with the record unchanged; 404 if it is deleted meanwhile."""
        registry = cluster().registry
        if "changed_from" not in args:
            return registry.get(engine_id).to_dict()
        seen = args["changed_from"]
        timeout = args.get("timeout", LONG_POLL_DEFAULT_S)
        return registry.wait(engine_id, lambda r: r.updated_at != seen, timeout).to_dict()

    @blp.arguments(StopArgsSchema, location="query")
    @blp.response(202, EngineSchema, description="DRAINING or STOPPING (graceful)")
    @blp.alt_response(200, schema=EngineSchema, description="External: forgotten (deleted)")
    @blp.doc(**_doc_errors(400, 404))
    def delete(self, args: dict[str, Any], engine_id: str) -> Any:
        """Stop an engine gracefully: a serving engine is DRAINING first (the gateway
        sends it no new request; those in flight finish, ``drain_timeout`` seconds at
        most), then SIGTERM, grace period, SIGKILL; then release. ``drain=false`` skips
        the drain (and ends one under way). An external engine is forgotten: its record
        (as it was) is answered with 200, and nothing is signalled."""
        forgotten = external.forget_external(cluster(), engine_id)
        if forgotten is not None:
            return forgotten.to_dict(), 200
        return stop_engine(
            cluster(), engine_id, drain=args["drain"], drain_timeout_s=args.get("drain_timeout")
        ).to_dict()


@blp.route("/<engine_id>/restart")
class EngineRestart(MethodView):
    @blp.response(202, EngineSchema)
    @blp.doc(**_doc_errors(404, 409, 503))
    def post(self, engine_id: str) -> dict[str, Any]:
        """Restart in place (same id); a FAILED engine is placed again. Not an external
        engine (409)."""
        external.refuse_if_external(cluster(), engine_id, "restart")
        return restart_engine(cluster(), engine_id).to_dict()


@blp.route("/<engine_id>/logs")
class EngineLogs(MethodView):
    @blp.arguments(LogArgsSchema, location="query")
    @blp.response(200, LogsSchema)
    @blp.doc(**_doc_errors(404, 409, 503))
    def get(self, args: dict[str, Any], engine_id: str) -> dict[str, Any]:
        """The last lines of the engine's log (read on its host)."""
        external.refuse_if_external(cluster(), engine_id, "read the log of")
        rec = cluster().registry.get(engine_id)
        lines = engine_logs(cluster(), engine_id, args["tail"])
        return {"engine_id": engine_id, "host": rec.host, "lines": lines}


@blp.route("/<engine_id>/events")
class EngineEventList(MethodView):
    @blp.response(200, EngineEventsSchema)
    @blp.doc(**_doc_errors(404))
    def get(self, engine_id: str) -> dict[str, Any]:
        """The engine's timeline, oldest first (bounded: the newest 200): placed,
        spawned, ready, probe failures, crashes with their reason, remediation,
        draining, stopped, and every state change."""
        c = cluster()
        c.registry.get(engine_id)  # 404 for an unknown engine
        events = []
        for ev in c.registry.events.list(engine_id):
            at, kind, message = ev.pop("at", None), ev.pop("kind", ""), ev.pop("message", "")
            events.append({"at": at, "kind": kind, "message": message, "data": ev})
        return {"engine_id": engine_id, "events": events}


@blp.route("/prune")
class EnginePrune(MethodView):
    @blp.arguments(PruneArgsSchema, location="query")
    @blp.response(200, PrunedSchema)
    def post(self, args: dict[str, Any]) -> dict[str, Any]:
        """Delete STOPPED and FAILED records older than ``older_than_s``."""
        c = cluster()
        age = args.get("older_than_s")
        age = c.settings.prune_after_s if age is None else age
        return {"pruned": prune_records(c.registry, c.ledger, age)}
