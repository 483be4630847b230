"""The server's own routes: health, version and metrics (`router`), and adapters at run time (`runtime_router`).

Two routers so that create_app can include them around the OpenAI and tokenizer routes, keeping the
order the routes always had (and so /openapi.json as it was).
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from adapterhub_lite.core import __version__
from adapterhub_lite.serving import protocol as P
from adapterhub_lite.serving.params import flag, unread
from adapterhub_lite.serving.routes.common import error_response, read_json, runtime_allowed, server

router = APIRouter()
runtime_router = APIRouter()


@router.get("/health")
async def health(request: Request):
    engine, catalogue = server(request).engine, server(request).catalogue
    if not engine.alive:
        return error_response(P.ApiError(503, "the engine is not running", "server_error", "unhealthy"))
    backbone = engine.router.backbone
    return {"status": "ok", "queue_depth": engine.queue_depth, "base": backbone.name, "device": str(backbone.device),
            "dtype": str(backbone.dtype).removeprefix("torch."), "quantization": backbone.fingerprint["quantization"],
            "max_model_len": engine.router.max_model_len, "route_threshold": engine.router.route_threshold,
            "changed_adapters": dict(engine.router.changed),  # files that changed under the server: refused at load
            "unavailable_adapters": catalogue.unavailable(),  # failed their checks: not served, the others are
            "budgets": dataclasses.asdict(engine.budgets), "kv_bytes_per_token": engine.router.bank.kv_bytes_per_token(),
            "memory": engine.router.memory(), "decode": engine.decode_info()}


@router.get("/version")
async def version():
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(server(request).engine.metrics.render(), media_type="text/plain; version=0.0.4")


# -- adapters at run time ------------------------------------------------------------------------
@runtime_router.post("/v1/load_lora_adapter")
async def load_adapter(request: Request):
    runtime_allowed(request)
    body = await read_json(request)
    # vLLM's load_inplace: replace the weights under a served name, else load as usual (clients that push a new version
    # every step send it true from the first load on, which vLLM answers as a plain load)
    inplace = flag(body, "load_inplace", False)
    server(request).handlers.ignore_aloud(unread(body, ("lora_name", "lora_path", "load_inplace")), "v1/load_lora_adapter", request.state.access)
    name = await server(request).catalogue.load(body.get("lora_name"), body.get("lora_path"), inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@runtime_router.post("/v1/unload_lora_adapter")
async def unload_adapter(request: Request):
    runtime_allowed(request)
    body = await read_json(request)
    server(request).handlers.ignore_aloud(unread(body, ("lora_name", "lora_int_id")), "v1/unload_lora_adapter", request.state.access)
    name = await server(request).catalogue.unload(body.get("lora_name"))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


@runtime_router.post("/v1/reload")
async def reload(request: Request):
    return await server(request).catalogue.reload()
