"""What an engine holds once every row has left: none of its last batch's working memory."""

from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.jobs import Job
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.router import Router


def test_a_mixed_batch_that_ends_in_one_step_leaves_no_gathered_factors(serve_registry):
    """Rows of two LoRA adapters (and an IA3 one) run to the same last step, so that step still gathers every row's
    factors from the slot pools (batch_row_bytes > 0 while they run). Once they have left, the idle engine holds none
    of it (0 bytes), not the last mixed batch's (3.7 MB a row on the default backbone)."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router)
    ended, seen = [], []
    for adapter in ("gen_a", "gen_b", "cls_ia3"):
        engine.submit(Job({"adapter": adapter, "prompt_ids": [5, 9, 14]}, lambda ev, p: ended.append(ev) if ev in ("done", "error") else None,
                          SamplingParams(max_tokens=4, ignore_eos=True)))
    for _ in range(400):
        if len(ended) == 3:
            break
        engine._serve_once()
        seen.append(router.memory()["batch_row_bytes"])
    assert ended == ["done"] * 3 and not engine._rows and engine._dec is None
    assert max(seen) > 0  # the batch did gather per-row factors
    assert router.bank.row_bytes() == 0 and router.memory()["batch_row_bytes"] == 0
