"""The OpenAI-compatible routes: the models served, completions, chat completions and classification.

What each does with a request is serving/handlers.py; the body is read here (read_json) so its size
limit and JSON errors are the same on every route.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from adapterhub_lite.serving.protocol import ApiError
from adapterhub_lite.serving.routes.common import read_json, server

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": server(request).catalogue.models()}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    """One model's card (the openai client's models.retrieve); an unknown id is a 404 in OpenAI's shape."""
    for card in server(request).catalogue.models():
        if card["id"] == model_id:
            return card
    raise ApiError(404, f"the model {model_id!r} does not exist; GET /v1/models lists them", "invalid_request_error", "model_not_found")


@router.post("/v1/completions")
async def completions(request: Request):
    return await server(request).handlers.completions(await read_json(request), request)


@router.post("/v1/chat/completions")
async def chat(request: Request):
    return await server(request).handlers.chat(await read_json(request), request)


@router.post("/v1/classify")
async def classify(request: Request):
    return await server(request).handlers.classify(await read_json(request), request)
