"""The tokenizer routes (as vLLM's): text to token ids, token ids to text, and the tokenizer's settings."""

from __future__ import annotations

from fastapi import APIRouter, Request

from adapterhub_lite.serving.routes.common import read_json, server

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request):
    return await server(request).handlers.tokenize(await read_json(request), request.state.access)


@router.post("/detokenize")
async def detokenize(request: Request):
    return await server(request).handlers.detokenize(await read_json(request), request.state.access)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    return server(request).handlers.tokenizer_info()
