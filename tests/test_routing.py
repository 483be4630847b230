"""Content routing: nearest prototype, confidence fallback to base, prototypes stored in the sidecar."""

import json

import torch

from adapterhub_lite.backbone import load_backbone
from adapterhub_lite.folder import read_sidecar
from adapterhub_lite.router.routing import ContentRouter, add_routing, embed, kmeans
from adapterhub_lite.spec import spec_from_dict
from adapterhub_lite.train import train


def unit(*v):
    return torch.nn.functional.normalize(torch.tensor([v], dtype=torch.float), dim=-1)


def test_nearest_prototype_wins_and_low_confidence_falls_back_to_base():
    router = ContentRouter({"a": torch.cat([unit(1, 0, 0), unit(0.9, 0.1, 0)]), "b": unit(0, 1, 0)}, threshold=0.9, temperature=0.05)
    routed = router.route(torch.cat([unit(1, 0.05, 0), unit(0.05, 1, 0), unit(1, 1, 0)]))
    assert [r for r, _ in routed] == ["a", "b", "base"]  # the last one sits between a and b
    assert routed[0][1] > 0.9 and routed[2][1] < 0.9


def test_kmeans_finds_two_clusters():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.cat([torch.randn(20, 3, generator=g) * 0.05 + torch.tensor([1.0, 0, 0]),
                                                 torch.randn(20, 3, generator=g) * 0.05 + torch.tensor([0, 1.0, 0])]), dim=-1)
    c = kmeans(x, 2)
    assert sorted(c.argmax(-1).tolist()) == [0, 1]


def test_prototypes_go_into_the_sidecar_and_route_their_own_inputs(tmp_path):
    bb = load_backbone("tiny-random-llama", "none")
    folders = {}
    for name, make in (("digits", lambda i: f"{i * 7919 % 100000:05d} {i % 13}"), ("letters", lambda i: "qwertyuiop"[i % 10] * (3 + i % 5))):
        rows = [{"text": make(i), "label": "x" if i % 2 else "y"} for i in range(40)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = spec_from_dict({"name": name, "type": "classification", "data": {"train": str(tmp_path / f"{name}.jsonl"), "dev": str(tmp_path / f"{name}.jsonl")},
                               "prompt": "{text} ->", "label": "label", "labels": ["x", "y"], "base": "tiny-random-llama", "quantization": "none",
                               "train": {"max_steps": 1, "eval_every": 1, "eval_samples": 4, "max_length": 32}})
        folders[name] = train(spec, tmp_path / f"run-{name}", progress=False)
        assert len(read_sidecar(folders[name])["routing"]["prototypes"]) == 4  # training stores them
        add_routing(folders[name], bb.model, bb.tokenizer, samples=32, k=2)
    metas = {n: read_sidecar(f) for n, f in folders.items()}
    assert len(metas["digits"]["routing"]["prototypes"]) == 2
    router = ContentRouter.from_sidecars(metas, threshold=0.0)
    routed = router.route(embed(bb.model, bb.tokenizer, ["31337 5", "tttttt", "04211 2", "eeee"]))
    assert [r for r, _ in routed] == ["digits", "letters", "digits", "letters"]
