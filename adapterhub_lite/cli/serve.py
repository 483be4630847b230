"""`adapterhub-lite serve`: the OpenAI-compatible server on one backbone (see serving/api.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket

from adapterhub_lite.cli.args import add_device_args, add_route_threshold, count, nonnegative_float, positive_float
from adapterhub_lite.core.errors import AdapterHubError

# The Ray Serve flags and their defaults: one given without --ray would be unread, so it is refused
RAY_DEFAULTS = {"replicas": 1, "autoscaling": None, "max_ongoing_requests": 64, "max_queued_requests": 256, "max_adapters_per_replica": 8,
                "gpus_per_replica": 0, "cpus_per_replica": 1, "ray_address": None}


def _serve(args) -> int:
    import uvicorn

    from adapterhub_lite.serving.api import HTTP_PARSER, build_app

    if args.max_input_tokens is not None and args.max_model_len is not None and args.max_input_tokens > args.max_model_len:
        raise AdapterHubError(f"--max-input-tokens {args.max_input_tokens} is past the context, --max-model-len {args.max_model_len}; "
                              "give it less, or leave it out (the context is then the limit)")
    if args.ray:  # (every replica is this server: the check above holds for them too)
        return _serve_ray(args)
    given = [f"--{k.replace('_', '-')}" for k, default in RAY_DEFAULTS.items() if getattr(args, k) != default]
    if given:  # they would be silently unread: one engine in this process, no replicas
        raise AdapterHubError(f"{', '.join(given)} configure Ray Serve replicas; add --ray to serve through Ray, or drop them")
    sock = _listen(args.host, args.port)  # before the backbone loads: a taken port is answered at once
    with _logging(args.log_level):
        app, engine, _ = build_app(args)
        # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets open requests finish (up to the grace
        # period), then the app's lifespan stops the engine after the queue is served. Its own access
        # line is off: ours (serving/api.py) also names the model, the adapter that answered and the tokens.
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, http=HTTP_PARSER,
                                timeout_graceful_shutdown=args.request_timeout)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            # A second Ctrl-C (uvicorn's force quit) skips the app's shutdown: the engine would decode on for nobody
            # while the interpreter exits under its thread (seen: a C++ abort, exit -6) and the merges' scratch
            # folder would stay. Both are no-ops after a graceful shutdown.
            engine.abort()
            engine.router.close()
    return 0


_RAY_ONLY = ("ray", "replicas", "autoscaling", "max_ongoing_requests", "max_queued_requests", "max_adapters_per_replica",
             "gpus_per_replica", "cpus_per_replica", "ray_address", "func", "command", "host", "port")


def _ray_settings(args) -> dict:
    """The Ray settings of `application` from the parsed flags; both --replicas and --autoscaling are refused, as Ray
    refuses num_replicas next to autoscaling_config (autoscaling's min/max_replicas set the count: --replicas was unread)."""
    if args.autoscaling is not None and args.replicas != RAY_DEFAULTS["replicas"]:
        raise AdapterHubError(f"--replicas {args.replicas} and --autoscaling both set how many replicas run; drop --replicas "
                              "(autoscaling's min_replicas and max_replicas bound it), or drop --autoscaling for a fixed count")
    return {"replicas": args.replicas, "autoscaling": args.autoscaling, "max_ongoing_requests": args.max_ongoing_requests,
            "max_queued_requests": args.max_queued_requests, "max_adapters_per_replica": args.max_adapters_per_replica,
            "num_gpus": args.gpus_per_replica, "num_cpus": args.cpus_per_replica}


def _serve_ray(args) -> int:
    """`serve --ray`: the server's app in --replicas engine replicas on Ray Serve behind one ingress (serving/scale.py)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise AdapterHubError("--ray needs Ray Serve, which is not installed: pip install 'adapterhub-lite[ray]' (or 'ray[serve]'), "
                              "or serve without --ray") from None
    import signal

    from adapterhub_lite.serving.scale import application

    options, settings = {k: v for k, v in vars(args).items() if k not in _RAY_ONLY}, _ray_settings(args)  # refused before Ray starts
    # SIGTERM ends the server as Ctrl-C does, so the Ray cluster started here is shut down with it
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ray.init(address=args.ray_address, ignore_reinit_error=True, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(options, **settings), name="adapterhub", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def ray_app(args: dict):
    """For `serve run adapterhub_lite.cli.serve:ray_app registry=adapters replicas=2 ...` and Ray Serve config files
    (README, "Scale out"): each key is a `serve` flag (max_batch_rows=16, allow_runtime_loading=true) or a Ray setting
    (replicas, autoscaling as JSON, max_ongoing_requests, max_queued_requests, max_adapters_per_replica,
    gpus_per_replica, cpus_per_replica); unset flags take the CLI's defaults. Any other key, or a bad value, raises
    AdapterHubError in one line (argparse would print its usage and exit inside Ray's app builder)."""
    from adapterhub_lite.serving.scale import application

    class Refuse(argparse.ArgumentParser):
        def error(self, message: str):
            raise AdapterHubError(f"ray_app: {message}; see adapterhub-lite serve --help")

    parser = Refuse(prog="adapterhub-lite")
    add_serve_command(parser.add_subparsers(dest="command"))
    flags_of = set(vars(parser.parse_args(["serve"]))) - {"command", "func"}  # every serve flag, at its default

    flags = ["serve"]
    for key, value in dict(args).items():
        if key in _RAY_OWN:  # given here they would be unread: Ray's proxy listens, and the app runs, where Ray says
            raise AdapterHubError(f"ray_app key {key!r} is Ray Serve's to set, not the application's: {_RAY_OWN[key]}")
        if key not in flags_of:
            raise AdapterHubError(f"ray_app key {key!r} is not a serve flag; give serve's flags with _ for - (max_batch_rows=16; "
                                  "adapterhub-lite serve --help) or the Ray settings replicas, autoscaling, max_ongoing_requests …")
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            if str(value).lower() == "true":
                flags.append(flag)
        else:
            flags += [flag, value if isinstance(value, str) else json.dumps(value)]
    ns = parser.parse_args(flags)
    return application({k: v for k, v in vars(ns).items() if k not in _RAY_ONLY}, **_ray_settings(ns))


# ray_app keys that are serve flags but Ray's to decide, and where to set them instead
_RAY_OWN = {"host": "the config file's http_options.host (or serve start --http-host)",
            "port": "the config file's http_options.port (or serve start --http-port)",
            "ray_address": "serve run --address, or RAY_ADDRESS",
            "ray": "ray_app always serves through Ray; drop it"}


def _autoscaling(text: str) -> dict:
    """argparse type of --autoscaling: JSON that Ray Serve's autoscaling_config takes (serving.scale.check_autoscaling)."""
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON; give Ray Serve's autoscaling_config as a JSON object, e.g. "
                                         '\'{"min_replicas": 1, "max_replicas": 4}\'') from None
    try:
        from adapterhub_lite.serving.scale import check_autoscaling

        return check_autoscaling(value)
    except ImportError:  # no Ray: --ray says so in its own line
        return value
    except AdapterHubError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch-rows", type=count(1), default=32, help="rows decoded together (1: one request at a time)")
    p.add_argument("--max-num-batched-tokens", type=count(1), help="tokens one step runs (a decoding row: 1; a prompt: its tokens, "
                   "in pieces over several steps when longer than what is left); at least --max-batch-rows (default: 2048 on a CPU, "
                   "8192 on a GPU, as vLLM's online-serving defaults; raised to --max-batch-rows if that is larger)")
    p.add_argument("--kv-cache-mb", type=positive_float, help="KV cache budget: a request reserves prompt + max_tokens positions when it "
                   "starts; requests that do not fit wait (default: no bound)")
    p.add_argument("--max-loras", type=count(1), help="distinct adapters in the running batch at once, and the LoRA / IA3 adapter slots "
                   "on the device (the least recently used is evicted for a new one); requests for others wait. With --max-lora-rank "
                   "each layer's slots are allocated once at max-loras × max-lora-rank (default: no bound)")
    p.add_argument("--max-cpu-loras", type=count(1), default=64, help="adapters kept read and checked in host memory (least recently "
                   "used go first); loading one onto the device is then a copy, no disk read (default 64)")
    p.add_argument("--decode-cache", choices=("static", "dynamic"), default="static",
                   help="static (default): running rows decode over a preallocated KV cache with device-side row state, one shape "
                        "per bucket (captured as CUDA graphs on a GPU); dynamic: over caches that grow and are re-padded every "
                        "step (the engine before static shapes; for comparison). Sliding-window models always decode dynamic")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="capture each decode step shape as a CUDA graph (static cache, GPU only). auto: unquantized backbones "
                        "(8-bit capture is unmeasured); on: try it on 8-bit too (falls back to eager with a warning); off: eager, "
                        "as vLLM's --enforce-eager")
    p.add_argument("--max-lora-rank", type=count(1), help="rank of every layer's adapter slots: memory per slot is fixed and "
                   "wider LoRA adapters are refused (default: the widest resident, growing as needed)")
    p.add_argument("--max-queue", type=count(1), default=256, help="requests waiting beyond the batch (each prompt × n a row); more get 429, "
                   "a request of more rows than this 400")
    p.add_argument("--max-model-len", type=count(1), help="context in tokens: prompt (+ an adapter's virtual tokens) + max_tokens must fit, "
                   "else 400 naming the numbers; prompts are never cut (default: the backbone's own)")
    p.add_argument("--max-input-tokens", type=count(1), help="longest prompt accepted, below the context (longer: 400; default: no limit but the context)")
    p.add_argument("--max-tokens", type=count(1), help="largest max_tokens accepted (larger: 400); default: no bound but the "
                   "context (prompt + max_tokens must fit --max-model-len), as vLLM")
    p.add_argument("--request-timeout", type=positive_float, default=120.0, help="seconds a request may take (then 504)")
    p.add_argument("--max-body-bytes", type=count(1), default=1 << 20, help="largest request body (larger: 413)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/* (default: $ADAPTERHUB_API_KEY, else none)")
    p.add_argument("--allow-runtime-loading", action="store_true", help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    add_route_threshold(p, "; shown in /health")
    p.add_argument("--memory-budget-mb", type=positive_float, help="evict least-recently-used adapters beyond this")
    p.add_argument("--max-merges", "--max-merged", type=count(1), default=16, help="per-request merges kept (folders on disk); the least recently used idle one goes first")
    p.add_argument("--allowed-origins", type=_origins, help="allow browser pages from these origins (CORS), comma-separated; default: CORS off")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="info (default): one access-log line per request; warning: only ignored fields and errors")
    add_device_args(p, adapters=True)
    r = p.add_argument_group("scale out on Ray Serve (pip install 'adapterhub-lite[ray]'; README: Scale out)")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve: engine replicas behind one ingress, each request "
                   "sent to a replica that holds its adapter (model multiplexing); every other flag applies to each replica")
    r.add_argument("--replicas", type=count(1), default=RAY_DEFAULTS["replicas"], help="engine replicas, each with its own backbone (default 1)")
    r.add_argument("--autoscaling", type=_autoscaling, help='Ray Serve autoscaling_config as JSON, instead of --replicas, e.g. '
                   '\'{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}\'')
    r.add_argument("--max-ongoing-requests", type=count(1), default=RAY_DEFAULTS["max_ongoing_requests"], help="requests a replica takes at once (Ray Serve's; default 64)")
    r.add_argument("--max-queued-requests", type=count(1), default=RAY_DEFAULTS["max_queued_requests"], help="requests waiting for a replica; more get 429 (default 256)")
    r.add_argument("--max-adapters-per-replica", type=count(1), default=RAY_DEFAULTS["max_adapters_per_replica"], help="adapters a replica is routed for at once; the least "
                   "recently used is forgotten past it (Ray Serve's max_num_models_per_replica; default 8)")
    r.add_argument("--gpus-per-replica", type=nonnegative_float, default=RAY_DEFAULTS["gpus_per_replica"], help="GPUs each replica takes (1 on a GPU machine; default 0)")
    r.add_argument("--cpus-per-replica", type=nonnegative_float, default=RAY_DEFAULTS["cpus_per_replica"], help="CPUs each replica takes (default 1)")
    r.add_argument("--ray-address", help="an existing Ray cluster (default: start one on this machine, or $RAY_ADDRESS)")
    p.set_defaults(func=_serve)
