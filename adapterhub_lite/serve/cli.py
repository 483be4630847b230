"""`adapterhub-lite serve`: the OpenAI-compatible server on one backbone (see serve/api.py)."""

from __future__ import annotations

import argparse
import os
import socket


def _serve(args) -> int:
    import uvicorn

    from ..router.router import Router
    from .api import Settings, create_app
    from .engine import Engine
    from .runtime import Catalogue

    key = args.api_key or os.environ.get("ADAPTERHUB_API_KEY") or None
    sock = _listen(args.host, args.port)  # before the backbone loads: a taken port is answered at once
    router = Router.from_registry(args.registry, quantization=args.quantization, device=args.device, dtype=args.dtype,
                                  memory_budget_mb=args.memory_budget_mb, allow_base_mismatch=args.allow_base_mismatch)
    engine = Engine(router, max_batch_rows=args.max_batch_rows, max_queue=args.max_queue)
    settings = Settings(max_input_tokens=args.max_input_tokens, max_tokens=args.max_tokens, request_timeout=args.request_timeout,
                        max_body_bytes=args.max_body_bytes, api_key=key, allow_runtime_loading=args.allow_runtime_loading)
    app = create_app(engine, settings, Catalogue(engine))
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets open requests finish (up to the grace
    # period), then the app's lifespan stops the engine after the queue is served.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.request_timeout)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The server's bound socket, or one line saying why the address cannot be used."""
    from ..errors import AdapterHubError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise AdapterHubError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 0 to 65535")
    return int(text)


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """Register `serve` on the main parser."""
    from ..cli import add_device_args, count, finite_float

    p = sub.add_parser("serve", help="serve the registry's adapters over an OpenAI-compatible HTTP API")
    p.add_argument("--registry", default="adapters", help="a local folder (default: adapters) or hf://org/repo")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-batch-rows", type=count(1), default=32, help="rows decoded together (1: one request at a time)")
    p.add_argument("--max-queue", type=count(1), default=256, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--max-input-tokens", type=count(1), default=1024, help="longest prompt accepted (longer: 400)")
    p.add_argument("--max-tokens", type=count(1), default=512, help="largest max_tokens accepted (larger: 400)")
    p.add_argument("--request-timeout", type=finite_float, default=120.0, help="seconds a request may take (then 504)")
    p.add_argument("--max-body-bytes", type=count(1), default=1 << 20, help="largest request body (larger: 413)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/* (default: $ADAPTERHUB_API_KEY, else none)")
    p.add_argument("--allow-runtime-loading", action="store_true", help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--memory-budget-mb", type=finite_float, help="evict least-recently-used adapters beyond this")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    add_device_args(p, adapters=True)
    p.set_defaults(func=_serve)
