"""Serving many adapters on one frozen backbone (imports ops, artifacts, model, core; never training).

    resident.py   adapters loaded on the backbone: PEFT folders of every kind into slots and tensors
    decoding.py   a decoding batch over the prefill's growing cache, and what every decoding batch offers
    static.py     a decoding batch over preallocated buffers (fixed shapes; CUDA graphs on a GPU)
    bank.py       the adapter bank (the runner): per-row batches of every kind, prefill, the decode step
    routing.py    content routing (auto): pick an adapter from the input
    reading.py    a request read for its adapter (auto routed, prompt ids against the context), classification scored
    manager.py    AdapterManager: known adapters, their residency (device, host cache); reading.py its request side
    router.py     Router: the manager with the user's calls (swap, merge, run); the public Python API
    params.py     every request field (implemented / accepted / refused) and a choice's settings
    sampling.py   the per-row token choice (vLLM's order)
    output.py     a choice's text and what each token adds
    scheduler.py  what runs at each step under the budgets (holds no model)
    jobs.py       a request in flight and what it reports
    admission.py  the engine's first half: arrivals to tickets, the plan admitted, prefill, rows joining
    engine.py     continuous batching: runs the scheduler's plan on the bank (server, infer, Router.run)
    offline.py    the engine driven to the end on the calling thread (Router.run, infer)
    protocol.py   OpenAI shapes and errors
    runtime.py    the served catalogue (registry, runtime loads, merges)
    handlers.py   what each route does; answers.py how its answer is written (whole or streamed)
    api.py        the FastAPI app and its middleware; metrics.py Prometheus counters and latency histograms
    routes/       the HTTP routes as FastAPI routers (openai, tokenizer, admin) and what they share
"""
