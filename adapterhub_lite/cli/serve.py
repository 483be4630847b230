"""`adapterhub-lite serve`: the OpenAI-compatible server on one backbone (see serve/api.py)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket

from adapterhub_lite.cli.args import add_device_args, count, finite_float


def _serve(args) -> int:
    import uvicorn

    from adapterhub_lite.serving.api import create_app
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.handlers import Settings
    from adapterhub_lite.serving.router import Router
    from adapterhub_lite.serving.runtime import Catalogue
    from adapterhub_lite.serving.scheduler import Budgets

    key = args.api_key or os.environ.get("ADAPTERHUB_API_KEY") or None
    budgets = Budgets(max_rows=args.max_batch_rows, max_num_batched_tokens=args.max_num_batched_tokens, max_loras=args.max_loras)  # checked before the backbone loads
    sock = _listen(args.host, args.port)  # before the backbone loads: a taken port is answered at once
    with _logging(args.log_level):
        router = Router.from_registry(args.registry, quantization=args.quantization, device=args.device, dtype=args.dtype,
                                      memory_budget_mb=args.memory_budget_mb, allow_base_mismatch=args.allow_base_mismatch,
                                      max_model_len=args.max_model_len, max_cpu_loras=args.max_cpu_loras,
                                      max_lora_rank=args.max_lora_rank, max_loras=args.max_loras)
        if args.kv_cache_mb is not None:  # in cache positions of this backbone
            budgets = dataclasses.replace(budgets, max_kv_tokens=int(args.kv_cache_mb * 2**20 // router.bank.kv_bytes_per_token()))
        engine = Engine(router, max_queue=args.max_queue, budgets=budgets)
        settings = Settings(max_input_tokens=args.max_input_tokens, max_tokens=args.max_tokens, request_timeout=args.request_timeout,
                            max_body_bytes=args.max_body_bytes, api_key=key, allow_runtime_loading=args.allow_runtime_loading,
                            allowed_origins=tuple(args.allowed_origins or ()))
        app = create_app(engine, settings, Catalogue(engine, max_merges=args.max_merges))
        # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets open requests finish (up to the grace
        # period), then the app's lifespan stops the engine after the queue is served. Its own access
        # line is off: ours (serve/api.py) also names the model, the adapter that answered and the tokens.
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                                timeout_graceful_shutdown=args.request_timeout)
        uvicorn.Server(config).run(sockets=[sock])
    return 0


@contextlib.contextmanager
def _logging(level: str):
    """The server's own lines (the access log, engine errors with their stack) on stderr at `level`, while it serves
    (taken back after, so a caller in the same process, e.g. a test, keeps its own logging)."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("adapterhub_lite.serve")  # the logger's name predates the serving package: users configure it
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]


def _origins(text: str) -> list[str]:
    origins = [o.strip() for o in text.split(",") if o.strip()]
    if not origins or any(o != "*" and not o.startswith(("http://", "https://")) for o in origins):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of origins: give e.g. https://app.example.com,http://localhost:3000 (or *)")
    return origins


def _listen(host: str, port: int) -> socket.socket:
    """The server's bound socket, or one line saying why the address cannot be used."""
    from adapterhub_lite.core.errors import AdapterHubError

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

    p = sub.add_parser("serve", help="serve the registry's adapters over an OpenAI-compatible HTTP API")
    p.add_argument("--registry", default="adapters", help="a local folder (default: adapters) or hf://org/repo")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-batch-rows", type=count(1), default=32, help="rows decoded together (1: one request at a time)")
    p.add_argument("--max-num-batched-tokens", type=count(1), help="tokens one step runs (a decoding row: 1; a prompt: its tokens, "
                   "in pieces over several steps when longer than what is left); at least --max-batch-rows (default: no bound)")
    p.add_argument("--kv-cache-mb", type=finite_float, help="KV cache budget: a request reserves prompt + max_tokens positions when it "
                   "starts; requests that do not fit wait (default: no bound)")
    p.add_argument("--max-loras", type=count(1), help="distinct adapters in the running batch at once, and the LoRA / IA3 adapter slots "
                   "on the device (the least recently used is evicted for a new one); requests for others wait. With --max-lora-rank "
                   "each layer's slots are allocated once at max-loras × max-lora-rank (default: no bound)")
    p.add_argument("--max-cpu-loras", type=count(1), default=64, help="adapters kept read and checked in host memory (least recently "
                   "used go first); loading one onto the device is then a copy, no disk read (default 64)")
    p.add_argument("--max-lora-rank", type=count(1), help="rank of every layer's adapter slots: memory per slot is fixed and "
                   "wider LoRA adapters are refused (default: the widest resident, growing as needed)")
    p.add_argument("--max-queue", type=count(1), default=256, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--max-model-len", type=count(1), help="context in tokens: prompt (+ an adapter's virtual tokens) + max_tokens must fit, "
                   "else 400 naming the numbers; prompts are never cut (default: the backbone's own)")
    p.add_argument("--max-input-tokens", type=count(1), help="longest prompt accepted, below the context (longer: 400; default: no limit but the context)")
    p.add_argument("--max-tokens", type=count(1), default=512, help="largest max_tokens accepted (larger: 400)")
    p.add_argument("--request-timeout", type=finite_float, default=120.0, help="seconds a request may take (then 504)")
    p.add_argument("--max-body-bytes", type=count(1), default=1 << 20, help="largest request body (larger: 413)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/* (default: $ADAPTERHUB_API_KEY, else none)")
    p.add_argument("--allow-runtime-loading", action="store_true", help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--memory-budget-mb", type=finite_float, help="evict least-recently-used adapters beyond this")
    p.add_argument("--max-merges", "--max-merged", type=count(1), default=16, help="per-request merges kept (folders on disk); the least recently used idle one goes first")
    p.add_argument("--allowed-origins", type=_origins, help="allow browser pages from these origins (CORS), comma-separated; default: CORS off")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="info (default): one access-log line per request; warning: only ignored fields and errors")
    add_device_args(p, adapters=True)
    p.set_defaults(func=_serve)
