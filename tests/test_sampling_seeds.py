"""Seeded sampling through the engine (vLLM's guarantee): a request with a `seed` gets the same completion whatever
else is in its batch (other rows, their settings, their count, its position) and whatever ran before; choices
i = 0..n-1 draw with seed + i; greedy rows beside sampled rows stay the argmax."""

import json
import threading

import pytest
import torch

from adapterhub_lite.artifacts.registries import open_registry
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.jobs import Job
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.protocol import ApiError
from adapterhub_lite.serving.router import Router

from .conftest import train_tiny

PROMPT = [5, 9, 14, 3]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    reg = d / "registry"
    reg.mkdir()
    (reg / "index.json").write_text(json.dumps({"format": "adapterhub_lite.registry/1", "adapters": {}}))
    open_registry(reg).publish(train_tiny(d, "toy"), "1.0.0", name="toy")
    router = Router.from_registry(reg, quantization="none", dtype="fp32")
    eng = Engine(router).start()
    yield eng
    eng.stop()
    router.close()


def run(engine, rows, errors=False):
    """Submit every (prompt ids, params) at once to the running engine; each row's generated token ids (or, with
    errors=True allowed, its error)."""
    out, left, done = [None] * len(rows), [len(rows)], threading.Event()
    lock = threading.Lock()

    def listener(i):
        def hear(event, payload):
            if event in ("done", "error"):
                out[i] = payload.token_ids if event == "done" else payload
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return hear
    for i, (ids, p) in enumerate(rows):
        engine.submit(Job({"adapter": "base", "prompt_ids": ids}, listener(i), params=p, default_max_tokens=p.max_tokens))
    assert done.wait(60)
    assert errors or not any(isinstance(o, Exception) for o in out), out
    return out


def S(**kw):
    return SamplingParams(max_tokens=10, ignore_eos=True, **kw)


def test_a_seeded_request_repeats_whatever_shares_its_batch_and_whatever_ran_before(engine):
    alone = run(engine, [(PROMPT, S(temperature=1.0, seed=42))])[0]
    torch.manual_seed(0)  # the process's own RNG has nothing to do with a seeded row
    run(engine, [(PROMPT, S(temperature=1.0)), ([1, 2], S(temperature=2.0, top_k=3))])  # unseeded draws in between
    assert run(engine, [(PROMPT, S(temperature=1.0, seed=42))])[0] == alone
    others = [([1, 2, 3], S(temperature=0.7, top_p=0.9)), ([7] * 9, S()), ([4, 4], S(temperature=1.5, top_k=5, seed=1)),
              ([8, 6, 7, 5, 3, 0, 9], S(temperature=1.0, repetition_penalty=1.3, logit_bias={5: 3.0}))]
    for pos in range(len(others) + 1):  # its position in the batch, and 0 to 4 rows of other settings around it
        rows = others[:pos] + [(PROMPT, S(temperature=1.0, seed=42))] + others[pos:]
        assert run(engine, rows[: pos + 1 + (pos % 3)])[pos] == alone, pos
    assert run(engine, [(PROMPT, S(temperature=1.0, seed=43))])[0] != alone  # the seed matters


def test_n_seeded_choices_differ_and_repeat_and_greedy_rows_beside_them_stay_the_argmax(engine):
    n = [(PROMPT, S(temperature=1.0, seed=7 + i)) for i in range(3)]  # choice i of a seeded request: seed + i (handlers.py)
    first = run(engine, n)
    assert len({tuple(c) for c in first}) == 3 and run(engine, n) == first
    greedy = run(engine, [(PROMPT, S())])[0]
    mixed = run(engine, [n[0], (PROMPT, S()), (PROMPT, S(temperature=5e-6, seed=9)), (PROMPT, S(temperature=1.0)), n[2]])
    assert mixed[1] == mixed[2] == greedy and mixed[0] == first[0] and mixed[4] == first[2]


def test_a_row_whose_every_allowed_token_is_masked_is_refused_alone(engine):
    """allowed_token_ids all stop tokens while min_tokens masks them: greedy used to emit token 0 (outside the
    allowed set), a sampled row to fail the decode step of every row beside it (a draw from NaN)."""
    eos = engine.router.backbone.tokenizer.eos_token_id
    bystander = run(engine, [(PROMPT, S())])[0]
    got = run(engine, [(PROMPT, SamplingParams(max_tokens=4, allowed_token_ids=(eos,), min_tokens=1)),
                       (PROMPT, SamplingParams(max_tokens=4, temperature=1.0, allowed_token_ids=(7,), stop_token_ids=(7,), min_tokens=2)),
                       (PROMPT, S())], errors=True)
    for err in got[:2]:
        assert isinstance(err, ApiError) and err.status == 400 and err.param == "allowed_token_ids", err
        assert "no token is left" in str(err)
    assert got[2] == bystander
    # ignore_eos keeps EOS unmasked: the row is fine, and EOS (its only allowed token) does not end it
    assert run(engine, [(PROMPT, SamplingParams(max_tokens=3, allowed_token_ids=(eos,), min_tokens=1, ignore_eos=True))])[0] == [eos] * 3


def test_unseeded_rows_draw_differently_and_leave_the_process_rng_alone(engine):
    """An unseeded row gets a fresh generator of its own; making it used to reseed torch's global RNG (torch.seed()),
    so a program serving in-process lost the reproducibility its torch.manual_seed gave it."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    drawn = run(engine, [(PROMPT, S(temperature=1.0)) for _ in range(4)])
    assert torch.equal(torch.rand(4), expected)
    assert len({tuple(d) for d in drawn}) > 1
