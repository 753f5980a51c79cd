"""/v1/management/models: the models each host has on its disk, with their facts and
the memory each would need at the default length."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.context import cluster
from app.core.gpus import mib_to_gb
from app.services.models import models_on_hosts

blp = Blueprint(
    "models",
    __name__,
    url_prefix="/v1/management",
    description="Models on the hosts' disks: facts measured there and memory estimates",
)


class ModelFactsSchema(ma.Schema):
    architecture = ma.fields.String()
    model_type = ma.fields.String()
    dtype = ma.fields.String(allow_none=True)
    weights_bytes = ma.fields.Integer(allow_none=True)
    weights_bytes_by_dtype = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Integer())
    file_bytes = ma.fields.Integer()
    param_count = ma.fields.Integer(allow_none=True)
    layers = ma.fields.Integer(allow_none=True)
    hidden_size = ma.fields.Integer(allow_none=True)
    kv_heads = ma.fields.Integer(allow_none=True)
    head_dim = ma.fields.Integer(allow_none=True)
    kv_latent_dim = ma.fields.Integer(allow_none=True)
    max_len = ma.fields.Integer(allow_none=True)
    quantization = ma.fields.String(allow_none=True)
    sentence_transformers = ma.fields.Boolean()


class EstimateSchema(ma.Schema):
    per_gpu_mib = ma.fields.Integer()
    per_gpu_gb = ma.fields.Function(lambda e: mib_to_gb(e.per_gpu_mib))
    weights_mib_per_gpu = ma.fields.Integer()
    kv_cache_mib_per_gpu = ma.fields.Integer()
    overhead_mib = ma.fields.Integer()
    headroom_mib = ma.fields.Integer()
    max_model_len = ma.fields.Integer()
    model_max_len = ma.fields.Integer(allow_none=True)
    source = ma.fields.String()
    explanation = ma.fields.Function(lambda e: e.explain())


class ModelOnDiskSchema(ma.Schema):
    model = ma.fields.String(metadata={"description": "Repo id (hub cache) or local path"})
    path = ma.fields.String(metadata={"description": "The directory on that host"})
    facts = ma.fields.Nested(ModelFactsSchema)
    estimate = ma.fields.Nested(EstimateSchema, allow_none=True)
    estimate_error = ma.fields.String(allow_none=True)


class HostModelsSchema(ma.Schema):
    host = ma.fields.String()
    up = ma.fields.Boolean()
    models = ma.fields.List(ma.fields.Nested(ModelOnDiskSchema))


class ModelsSchema(ma.Schema):
    default_max_model_len = ma.fields.Integer()
    hosts = ma.fields.List(ma.fields.Nested(HostModelsSchema))


@blp.route("/models")
class Models(MethodView):
    @blp.response(200, ModelsSchema)
    def get(self) -> dict[str, Any]:
        """Per host, the models its worker found on its disk (Hugging Face cache, model
        roots, its engines' paths) with their facts, and the memory per GPU each would
        need as a vLLM engine (a sentence-transformers model: as an embedding server) at
        the default maximum length on one GPU. A DOWN host's models are listed with
        ``up: false``; placement does not use them."""
        c = cluster()
        length = c.settings.default_max_model_len
        return {
            "default_max_model_len": length,
            "hosts": models_on_hosts(c.registry, default_max_model_len=length),
        }
