"""Content routing's novelty check: `auto` sends an input unlike every adapter's samples to base, where the
classifier alone (a softmax over the known adapters, confident far from all of them) would pick one."""

import json

import pytest
import torch

from adapterhub_lite.artifacts.folder import read_sidecar
from adapterhub_lite.artifacts.samples import embed, embedding_spec, load_routing
from adapterhub_lite.core.errors import DataError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.routing import ContentRouter

from .conftest import train_tiny


def clusters(n: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two tight clusters in 8 dims, far apart on the first two axes."""
    g = torch.Generator().manual_seed(seed)
    centers = {"a": torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 0]), "b": torch.tensor([0, 4.0, 0, 0, 0, 0, 0, 0])}
    return {k: c + 0.3 * torch.randn(n, 8, generator=g) for k, c in centers.items()}


FAR = torch.tensor([[0.0, 0, 5.0, -5.0, 5.0, 0, 0, 0], [0.0, 0, 0, 0, 0, -6.0, 6.0, 6.0]])  # off both clusters' axes


def test_a_far_away_point_goes_to_base_while_in_cluster_points_keep_their_adapter():
    router = ContentRouter(clusters())
    fresh = clusters(n=50, seed=1)  # unseen points of each cluster
    for name, x in fresh.items():
        routed = [r for r, _ in router.route(x)]
        assert routed.count(name) >= 47 and set(routed) <= {name, "base"}  # ~99% of an adapter's own kind pass
    far = router.route(FAR)
    assert [r for r, _ in far] == ["base", "base"]
    assert (router.distances(FAR) > 1).all() and (router.distances(fresh["a"])[:, 0].median() < 1)


def test_without_the_novelty_check_the_classifier_alone_sends_far_points_to_an_adapter():
    """What the check is there for: the softmax is sure of an adapter for points far from both."""
    alone = ContentRouter(clusters(), novelty=None)
    assert all(name in ("a", "b") and conf >= 0.5 for name, conf in alone.route(FAR))


def test_the_cutoff_is_a_quantile_of_the_adapters_own_held_out_distances():
    samples = clusters()
    loose, strict = ContentRouter(samples, novelty=1.0), ContentRouter(samples, novelty=0.5)
    assert all(s < lo for s, lo in zip(strict.cutoffs, loose.cutoffs))
    fresh = clusters(n=200, seed=2)["a"]
    share = sum(r == "a" for r, _ in strict.route(fresh)) / len(fresh)
    # the median of held-out distances lets about half of the cluster's own points through (somewhat more: the
    # index a request meets holds every fold, so its neighbours are a little nearer than a held-out fold's)
    assert 0.4 < share < 0.85
    again = ContentRouter(samples)
    assert again.cutoffs == ContentRouter(samples).cutoffs  # deterministic: same samples, same cut-offs


def test_a_lone_sample_accepts_only_itself_and_a_non_finite_embedding_goes_to_base():
    router = ContentRouter({"one": torch.tensor([[1.0, 2.0, 3.0]]), "two": torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.2, 0.1], [2.9, 1.0, 0.0]])})
    assert router.route(torch.tensor([[1.0, 2.0, 3.0]]))[0][0] == "one"
    assert router.route(torch.tensor([[1.0, 2.5, 2.0]]))[0][0] == "base"
    routed = router.route(torch.tensor([[float("nan"), 0.0, 0.0], [3.0, 1.1, 0.0]]))  # an empty text embeds as NaN: nothing to route by
    assert routed[0] == ("base", 0.0) and routed[1][0] == "two"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Router over a tiny classification adapter (rows "pos 3", "neg 5", ...) and a copy adapter ("ab", "cd", ...)."""
    d = tmp_path_factory.mktemp("novelty")
    gen = d / "copy.jsonl"
    gen.write_text("".join(json.dumps({"text": t, "target": t.upper()}) + "\n" for t in ["ab", "cd", "ef", "gh", "ij", "kl"]))
    folders = {"cls_a": train_tiny(d, "cls_a"),
               "gen": train_tiny(d, "gen", type="generation", labels=None, label=None, target="target", metric=["exact_match"],
                                 data={"train": str(gen), "dev": str(gen)}, prompt="In: {text}\nOut:", train={"max_new_tokens": 3})}
    r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    for name, folder in folders.items():
        r.register(name, folder)
    return r, folders


FAR_TEXT = "Wie spät ist es in Tokio? 東京の時間は何時ですか"


def test_the_far_text_is_one_the_classifier_alone_gives_an_adapter(served):
    """Guards the test below: without the novelty check that request would go to an adapter, with it to base."""
    router, folders = served
    model, tok = router.backbone.model, router.backbone.tokenizer
    samples = {n: load_routing(f, read_sidecar(f), embedding_spec(model)) for n, f in folders.items()}
    vector = embed(model, tok, [FAR_TEXT])
    assert ContentRouter(samples, novelty=None).route(vector)[0][0] in folders
    assert ContentRouter(samples).route(vector)[0][0] == "base"


def test_an_auto_request_far_from_every_adapter_answers_as_base_and_says_so(served):
    router, _ = served
    out = router.run([{"adapter": "auto", "text": "pos 3", "max_new_tokens": 2}, {"adapter": "auto", "text": "cd", "max_new_tokens": 2},
                      {"adapter": "auto", "text": FAR_TEXT, "max_new_tokens": 2}])
    assert [o["adapter"] for o in out] == ["cls_a", "gen", "base"]
    assert out[2] == {**router.run([{"adapter": "base", "text": FAR_TEXT, "max_new_tokens": 2}])[0], "routing": out[2]["routing"]}
    assert out[2]["routing"]["fallback"] == "novelty" and out[2]["routing"]["candidate"] in ("cls_a", "gen")


def test_an_empty_auto_request_is_refused_as_an_empty_prompt_not_a_scikit_learn_nan_error(served):
    """An empty text has no token to pool (its embedding is NaN): routing sends it to base, whose reading refuses
    the empty prompt with its own one-line error; before, scikit-learn raised "Input X contains NaN"."""
    router, _ = served
    assert router.route([{"adapter": "auto", "text": ""}, {"adapter": "auto", "text": "pos 3"}]) == ["base", "cls_a"]
    with pytest.raises(DataError, match=r"the prompt is empty \(0 tokens\)"):
        router.run([{"adapter": "auto", "text": ""}])


def test_a_training_row_with_an_empty_input_is_left_out_of_the_routing_sample(tmp_path):
    """Its embedding is NaN (no token to pool); stored, it would make load_routing refuse the whole adapter."""
    from adapterhub_lite.artifacts.samples import routing_entry
    from adapterhub_lite.core.spec import spec_from_dict

    rows = [{"text": t, "label": "x"} for t in ["pos 1", "", "pos 2", "neg 3"]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict({"name": "d", "type": "classification", "data": {"train": str(tmp_path / "d.jsonl"), "dev": str(tmp_path / "d.jsonl")},
                           "prompt": "{text} ->", "label": "label", "labels": ["x", "y"], "base": "tiny-random-llama", "quantization": "none"})
    backbone = load_backbone("tiny-random-llama", "none")
    record = routing_entry(backbone.model, backbone.tokenizer, spec, tmp_path / "out")
    assert record["samples"] == 3
    assert load_routing(tmp_path / "out", {"routing": record}, embedding_spec(backbone.model)).shape[0] == 3
