"""Serving many adapters on one frozen backbone (imports ops, artifacts, model, core; never training).

    bank.py       the adapter bank: per-row adapters of every kind, incremental decoding, the KV-cache join
    routing.py    content routing (auto): pick an adapter from the input
    router.py     Router: swap, merge and batch adapters; the public Python API
    params.py     every request field (implemented / accepted / refused) and a choice's settings
    sampling.py   the per-row token choice (vLLM's order)
    output.py     a choice's text and what each token adds
    engine.py     the continuous-batching scheduler
    protocol.py   OpenAI shapes and errors
    runtime.py    the served catalogue (registry, runtime loads, merges)
    handlers.py   what each route does
    api.py        the FastAPI app and its middleware; metrics.py Prometheus counters
    routes/       the HTTP routes as FastAPI routers (openai, tokenizer, admin) and what they share
"""
