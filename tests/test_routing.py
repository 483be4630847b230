"""Content routing: a logistic-regression router over per-adapter embedding samples, base fallback,
routing files written by training and refused when they used another embedding."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_lite.artifacts.folder import read_sidecar
from adapterhub_lite.artifacts.samples import ROUTING_FILE, RoutingError, add_routing, embed, embedding_spec, load_routing
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.routing import ContentRouter
from adapterhub_lite.training.recipes.train import train

from .conftest import TEST_DEVICE


def blobs(centers: dict[str, list[float]], n: int = 40, spread: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.tensor(c) + spread * torch.randn(n, len(c), generator=g) for k, c in centers.items()}


def test_classifier_routes_separable_samples_and_falls_back_to_base_when_unsure(device):
    centers = {"a": [3.0, 0, 0, 0], "b": [0, 3.0, 0, 0], "c": [0, 0, 3.0, 0]}
    router = ContentRouter(blobs(centers), threshold=0.9)
    fresh = blobs(centers, n=10, seed=1)  # unseen points from the same clusters
    for name, x in fresh.items():  # requests arrive embedded on the model's device; the router fits and routes on the host
        assert [r for r, _ in router.route(x.to(device))] == [name] * 10
    routed = router.route(torch.tensor([[1.5, 1.5, 0.0, 0.0]]))  # halfway between a and b
    assert routed[0][0] == "base" and routed[0][1] < 0.9
    assert router.probs(fresh["c"]).sum(-1).allclose(torch.ones(10))


def test_router_fits_when_the_caller_serves_under_inference_mode():
    centers = {"a": [3.0, 0], "b": [0, 3.0]}
    with torch.inference_mode():  # how Router serves; the samples are inference tensors too
        samples = {k: v.clone() for k, v in blobs(centers).items()}
        router = ContentRouter(samples)
        assert [r for r, _ in router.route(torch.tensor([[3.0, 0.0], [0.0, 3.0]]))] == ["a", "b"]


def test_classes_count_equally_whatever_their_sample_sizes():
    # a has 20x the samples of b; a point just on b's side of the middle must still go to b
    samples = {"a": blobs({"a": [-1.0, 0]}, n=400, spread=0.5)["a"], "b": blobs({"b": [1.0, 0]}, n=20, spread=0.5, seed=2)["b"]}
    router = ContentRouter(samples, threshold=0.0)
    assert router.route(torch.tensor([[0.3, 0.0]]))[0][0] == "b"


@pytest.mark.parametrize("k", [2, 3])
def test_the_fit_minimises_the_documented_objective(k):
    """ContentRouter's C stands for `mean class-weighted CE + l2 * ||W||^2` on standardised features: its solution
    scores (under that objective, computed here directly) what a direct minimisation of it scores."""
    g = torch.Generator().manual_seed(k)
    samples = {f"c{i}": torch.randn(20 + 15 * i, 6, generator=g) + torch.randn(6, generator=g) for i in range(k)}  # unequal counts
    x = torch.cat(list(samples.values())).double()
    y = torch.cat([torch.full((len(v),), i) for i, v in enumerate(samples.values())])
    z, weight, l2 = (x - x.mean(0)) / x.std(0, correction=0), len(y) / (k * torch.bincount(y).double()), 1e-2

    def objective(w, b):
        return torch.nn.functional.cross_entropy(z @ w + b, y, weight=weight) + l2 * w.square().sum()

    w, b = torch.zeros(6, k, dtype=torch.double, requires_grad=True), torch.zeros(k, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)
    opt.step(lambda: (opt.zero_grad(), objective(w, b).backward(), objective(w, b))[-1])
    fitted = ContentRouter(samples, l2=l2).model[-1]
    coef, bias = torch.tensor(fitted.coef_).double().T, torch.tensor(fitted.intercept_).double()
    if k == 2:  # sklearn's binary form holds the logit difference d; the K-vector form is (-d/2, d/2)
        coef, bias = torch.cat([-coef / 2, coef / 2], 1), torch.cat([-bias / 2, bias / 2])
    assert objective(coef, bias).item() == pytest.approx(objective(w, b).item(), rel=1e-3)


def test_one_adapter_takes_every_request_and_an_empty_sample_is_refused():
    router = ContentRouter({"only": torch.randn(5, 4)}, threshold=0.9)
    assert router.route(torch.randn(3, 4)) == [("only", 1.0)] * 3
    with pytest.raises(RoutingError, match=r"non-empty \[N, dim\] tensors of one dim, got shapes .*'b': \(0, 4\)"):
        ContentRouter({"a": torch.randn(5, 4), "b": torch.zeros(0, 4)})
    with pytest.raises(RoutingError, match="of one dim"):
        ContentRouter({"a": torch.randn(5, 4), "b": torch.randn(5, 3)})


def test_no_routing_data_is_a_clear_error():
    with pytest.raises(RoutingError, match="no adapter has usable routing data") as err:
        ContentRouter({})
    assert isinstance(err.value, AdapterHubError) and isinstance(err.value, ValueError)


def _train(tmp_path, name, make):
    rows = [{"text": make(i), "label": "x" if i % 2 else "y"} for i in range(40)]
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict({"name": name, "type": "classification", "data": {"train": str(tmp_path / f"{name}.jsonl"), "dev": str(tmp_path / f"{name}.jsonl")},
                           "prompt": "{text} ->", "label": "label", "labels": ["x", "y"], "base": "tiny-random-llama", "quantization": "none",
                           "train": {"max_steps": 1, "eval_every": 1, "eval_samples": 4, "max_length": 32}})
    return train(spec, tmp_path / f"run-{name}", progress=False)


def test_training_writes_the_routing_file_and_its_own_inputs_route_back(tmp_path):
    backbone = load_backbone("tiny-random-llama", "none")
    folders = {"digits": _train(tmp_path, "digits", lambda i: f"{i * 7919 % 100000:05d} {i % 13}"),
               "letters": _train(tmp_path, "letters", lambda i: "qwertyuiop"[i % 10] * (3 + i % 5))}
    spec = embedding_spec(backbone.model)
    assert spec["layers"] == [1, 2] and spec["pooling"] == ["mean", "last"] and spec["dim"] == 4 * 64
    for folder in folders.values():
        record = read_sidecar(folder)["routing"]
        assert record["file"] == ROUTING_FILE and record["embedding"] == spec and record["samples"] == 40  # all 40 rows
        stored = load_file(folder / ROUTING_FILE)["embeddings"]
        assert stored.dtype == torch.float16 and stored.shape == (40, spec["dim"])
    add_routing(folders["digits"], backbone.model, backbone.tokenizer, samples=32, seed=3)  # refit in place
    assert read_sidecar(folders["digits"])["routing"]["samples"] == 32
    loaded = load_routing(folders["digits"], read_sidecar(folders["digits"]), spec)
    assert loaded.shape == (32, spec["dim"]) and loaded.dtype == torch.float32
    router = ContentRouter({n: load_routing(f, read_sidecar(f), spec) for n, f in folders.items()}, threshold=0.0)
    routed = router.route(embed(backbone.model, backbone.tokenizer, ["31337 5", "tttttt", "04211 2", "eeee"]))
    assert [r for r, _ in routed] == ["digits", "letters", "digits", "letters"]


def test_routing_data_of_another_embedding_or_none_is_refused(tmp_path):
    folder = _train(tmp_path, "digits", lambda i: f"{i:05d}")
    meta = read_sidecar(folder)
    spec = meta["routing"]["embedding"]
    with pytest.raises(RoutingError, match=r"used embedding .*'layers': \[1, 2\].* this backbone embeds with .*'layers': \[0, 2\].*refit it with add_routing"):
        load_routing(folder, meta, {**spec, "layers": [0, 2]})
    old = {**meta, "routing": {"embedding": "mean-pooled last hidden state", "prototypes": [[0.1, 0.2]]}}  # the old prototype record
    with pytest.raises(RoutingError, match="has no routing file; fit one with add_routing"):
        load_routing(folder, old, spec)
    save_file({"embeddings": torch.zeros(40, 128)}, folder / ROUTING_FILE)  # a file that does not fit its record
    with pytest.raises(RoutingError, match=r"holds embeddings of shape \[40, 128\], expected \[N, 256\]"):
        load_routing(folder, meta, spec)
    with pytest.raises(RoutingError, match="not a plain file name"):
        load_routing(folder, {**meta, "routing": {**meta["routing"], "file": "../routing.safetensors"}}, spec)


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the guard stands in for a GPU on the CPU; on a GPU the mix-ups it flags fail for real")
def test_device_guard_finds_what_would_fail_on_a_gpu(device_guard, device):
    """The guard (conftest.DeviceGuard) flags, on the CPU, the mix-ups CUDA refuses, and lets through what CUDA allows."""
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    with device_guard, torch.no_grad():
        host = backbone.tokenizer(["T: pos 1\nL:"], return_tensors="pt")
        logits = backbone.model(**host).logits  # tokenizer output left on the host: the classic test bug
        logits[torch.tensor([0]), torch.tensor([1])]  # host indices into a device tensor: fine on CUDA
        logits.sum(-1) * torch.tensor(2.0)  # a host 0-dim tensor: fine on CUDA
    assert list(device_guard.problems) == ["tests/test_routing.py:" + str(_line("logits = backbone.model(**host)")) + " embedding"]
    device_guard.problems.clear()
    with device_guard, torch.no_grad():
        backbone.model(**backbone.tokenizer(["T: pos 1\nL:"], return_tensors="pt").to(device)).logits[0, -1].cpu().numpy()
    assert device_guard.problems == {}
    with device_guard:
        backbone.model.get_input_embeddings().weight.detach().numpy()
        torch.ones(3) + backbone.model.get_input_embeddings().weight[0, :3]
    assert sorted(device_guard.problems.values()) == [".numpy() of a device tensor (call .cpu() first)", "host tensor(s) of shape [(3,)] meet device tensors"]


def test_routing_keeps_every_tensor_where_it_belongs(tmp_path, device_guard):
    """Embedding runs on the model's device, the content router on the host; nothing crosses unasked."""
    backbone = load_backbone("tiny-random-llama", "none")
    with device_guard:
        vectors = embed(backbone.model, backbone.tokenizer, ["31337 5", "tttttt", "04211 2"], batch_size=2)
        router = ContentRouter({"a": vectors[:2], "b": vectors[1:]}, threshold=0.0)
        router.route(embed(backbone.model, backbone.tokenizer, ["eeee"]))
    assert device_guard.problems == {}


def _line(text: str) -> int:
    """Line number of `text` in this file (for the guard's report)."""
    return next(i for i, line in enumerate(open(__file__), 1) if text in line and "_line(" not in line)



def test_missing_or_unreadable_routing_data_is_a_routing_error(tmp_path):
    """What the router leaves out with a warning must be a RoutingError, never FileNotFoundError or a safetensors error."""
    folder = _train(tmp_path, "digits", lambda i: f"{i:05d}")
    meta = read_sidecar(folder)
    spec = meta["routing"]["embedding"]
    for record in (None, "mean-pooled", {"file": 3, "embedding": spec}):  # no record (a merged adapter), or not one of ours
        with pytest.raises(RoutingError):
            load_routing(folder, {**meta, "routing": record}, spec)
    (folder / ROUTING_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(RoutingError, match=r"routing.safetensors cannot be read \(SafetensorError: .*\); refit it with add_routing"):
        load_routing(folder, meta, spec)
    save_file({"embeddings": torch.full((4, spec["dim"]), float("nan"))}, folder / ROUTING_FILE)
    with pytest.raises(RoutingError, match="non-finite embeddings"):
        load_routing(folder, meta, spec)
    (folder / ROUTING_FILE).unlink()
    with pytest.raises(RoutingError, match="names routing file 'routing.safetensors', which is missing; refit it with add_routing"):
        load_routing(folder, meta, spec)


def test_embedding_projects_nothing_onto_the_vocabulary():
    """Routing embeddings read hidden states only: the LM head sees no position (logits_to_keep=1 projected each
    row's last position onto the vocabulary and threw it away), and the embedding is the hidden states' own."""
    backbone = load_backbone("tiny-random-llama", "none")
    model, tok = backbone.model, backbone.tokenizer
    texts = ["a short one", "a somewhat longer input text", "x"]
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[:-1].numel()))
    try:
        got = embed(model, tok, texts, batch_size=2)
    finally:
        handle.remove()
    assert seen == [0, 0]  # two batches, no position projected
    enc = tok(texts[1:2], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    h = hidden[embedding_spec(model)["layers"][-1]][0].float()
    last = torch.nn.functional.normalize(h[-1], dim=-1)  # the last pool: last-token state of the last layer
    assert torch.allclose(got[1, -h.shape[-1]:], last, atol=1e-5)
