"""Router: one batch mixes classification adapters whose tasks have different label counts."""

import json

import pytest

from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.router import Router

from .conftest import train_tiny


def test_batch_mixes_two_and_three_label_tasks(tmp_path):
    """A 2-label and a 3-label adapter in one batch: each row scored over its own labels, as it is alone."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} {i}", "label": w}) + "\n" for i in range(6) for w in ("pos", "neg", "mid")))
    rand = {"init_lora_weights": False}  # the adapters differ from the base and from each other after 2 steps
    two = train_tiny(tmp_path, "two", method_args=rand, train={"seed": 1, "lr": 5e-2})
    three = train_tiny(tmp_path, "three", labels=["pos", "neg", "mid"], data={"train": str(data), "dev": str(data)},
                       method_args=rand, train={"seed": 2, "lr": 5e-2})
    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    router.register("two", two)
    router.register("three", three)
    reqs = [{"adapter": "two", "text": "pos 1"}, {"adapter": "three", "text": "mid 2"},
            {"adapter": "two", "text": "neg 3"}, {"adapter": "three", "text": "neg 4"}]
    router.hold(["two", "three"])
    rows = [router.prepare(req, req["adapter"]) for req in reqs]
    batch = router.classify(rows)
    assert [len(probs) for _, probs in batch] == [2, 3, 2, 3]
    for (pred, probs), row in zip(batch, rows):
        alone_pred, alone_probs = router.classify([row])[0]
        assert pred == alone_pred and probs == pytest.approx(alone_probs, abs=1e-5)
        assert sum(probs) == pytest.approx(1.0)
    assert [r["prediction"] for r in router.run(reqs)] == [router.run([req])[0]["prediction"] for req in reqs]
