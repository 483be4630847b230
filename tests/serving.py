"""Serving helpers shared by the server tests: a registry of every adapter kind, and a server on a free port."""

import json
import shutil
import socket
import threading
import time

import httpx
import openai
import uvicorn

from adapterhub_lite.artifacts.registries import open_registry
from adapterhub_lite.serving.api import HTTP_PARSER, create_app
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.handlers import Settings
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.runtime import Catalogue

from .conftest import train_tiny

KEY = "test-key"
GEN = {"type": "generation", "labels": None, "label": None, "target": "target", "metric": ["exact_match"], "prompt": "In: {text}\nOut:"}


def gauge(metric) -> float:
    """An unlabelled gauge's value as /metrics reads it (the request gauges are read when scraped and store none)."""
    return next(s.value for s in metric.collect()[0].samples)


def slowed(served, monkeypatch, seconds=0.05):
    """Every engine step a little slower, so a 400-token request surely outlives what the test waits for."""
    once = served.engine._serve_once

    def slow():
        time.sleep(seconds)
        return once()

    monkeypatch.setattr(served.engine, "_serve_once", slow)


def damaged_registry(serve_registry, tmp_path):
    """A copy of serve_registry in which gen_b@1.0.0's weights fail their sha256 check (one byte flipped)."""
    reg = tmp_path / "registry"
    shutil.copytree(serve_registry, reg)
    weights = reg / "gen_b" / "1.0.0" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    return reg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_registry(d):
    """Nine adapters of every kind the bank serves (LoRA, IA3, prefix, prompt; classification and generation), published under d/registry."""
    gen = d / "copy.jsonl"
    gen.write_text("".join(json.dumps({"text": t, "target": t.upper()}) + "\n" for t in ["ab", "cd", "ef", "gh"]))
    rand = {"init_lora_weights": False}  # random B: every LoRA moves the outputs from the first step
    qv = {"target_modules": ["q_proj", "v_proj"]}  # gen_b keeps the default (every linear layer)
    g = {**GEN, "data": {"train": str(gen), "dev": str(gen)}}
    folders = {
        "cls_a": train_tiny(d, "cls_a", method_args={**qv, **rand}, train={"seed": 1, "lr": 5e-2}),
        "cls_b": train_tiny(d, "cls_b", method_args={"r": 4, "target_modules": ["k_proj", "o_proj"], **rand}, train={"seed": 2, "lr": 5e-2}),
        "cls_prefix": train_tiny(d, "cls_prefix", method="prefix", method_args={"num_virtual_tokens": 3}),
        "cls_prompt": train_tiny(d, "cls_prompt", method="prompt", method_args={"num_virtual_tokens": 4}),
        "cls_ia3": train_tiny(d, "cls_ia3", method="ia3", train={"lr": 0.5, "seed": 5}),
        "gen_a": train_tiny(d, "gen_a", **g, method_args={**qv, **rand}, train={"max_new_tokens": 4, "seed": 3}),
        "gen_b": train_tiny(d, "gen_b", **g, method_args={"r": 16, **rand}, train={"max_new_tokens": 5, "seed": 4}),
        "gen_prefix": train_tiny(d, "gen_prefix", **g, method="prefix", method_args={"num_virtual_tokens": 2}, train={"max_new_tokens": 4}),
        "gen_prompt": train_tiny(d, "gen_prompt", **g, method="prompt", method_args={"num_virtual_tokens": 5}, train={"max_new_tokens": 4}),
    }
    reg = d / "registry"
    reg.mkdir()
    (reg / "index.json").write_text(json.dumps({"format": "adapterhub_lite.registry/1", "adapters": {}}))
    r = open_registry(reg)
    for name, folder in folders.items():
        r.publish(folder, "1.0.0", name=name)
    r.publish(folders["gen_a"], "0.9.0", name="gen_b")  # an older, different version: gen_b@0.9.0 is gen_a's weights
    return reg


class Served:
    """A server on a free port in this process, stopped at the end."""

    def __init__(self, registry, max_model_len=None, **settings):
        self.router = Router.from_registry(registry, quantization="none", dtype="fp32", max_model_len=max_model_len,
                                           memory_budget_mb=settings.pop("memory_budget_mb", None), max_loras=settings.pop("max_loras", None),
                                           max_lora_rank=settings.pop("max_lora_rank", None))
        self.engine = Engine(self.router, max_batch_rows=settings.pop("max_batch_rows", 32), max_queue=settings.pop("max_queue", 256),
                             budgets=settings.pop("budgets", None))
        self.port = free_port()
        self.catalogue = Catalogue(self.engine)
        app = create_app(self.engine, Settings(**{"api_key": KEY, "allow_runtime_loading": True, **settings}), self.catalogue)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", http=HTTP_PARSER))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def post(self, path, body=None, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
