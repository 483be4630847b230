"""Content routing (`auto`) under hostile settings and catalogues: thresholds that are no probability, pinned
versions beside their latest, adapters registered in another order or indistinguishable from each other."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from adapterhub_lite.artifacts.samples import RoutingError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.routing import ContentRouter

from .conftest import train_tiny
from .test_routing_novelty import clusters

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_routing.py"


@pytest.mark.parametrize("bad", [math.nan, 1.5, -0.1, math.inf, True, "0.5", None])
def test_a_threshold_that_is_no_probability_is_refused(bad):
    """A NaN threshold compared false with every confidence and sent every `auto` request to base, unsaid; so did 1.5."""
    with pytest.raises(RoutingError, match=rf"^threshold is {bad!r}; give a probability from 0 to 1$".replace("(", r"\(")):
        ContentRouter(clusters(), threshold=bad)
    with pytest.raises(RoutingError, match=r"^novelty is 2; give a probability from 0 to 1 \(or None to switch it off\)$"):
        ContentRouter(clusters(), novelty=2)
    for ok in (0, 1, 0.5):
        ContentRouter(clusters(), threshold=ok)


def test_the_router_refuses_such_a_threshold_at_construction_not_at_the_first_auto_request():
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    with pytest.raises(RoutingError, match=r"^route_threshold is nan; give a probability from 0 to 1$") as err:
        Router(backbone, route_threshold=math.nan)
    assert isinstance(err.value, ValueError)
    # from_registry refuses it before it opens the registry and loads a backbone (this registry does not exist)
    with pytest.raises(RoutingError, match=r"^route_threshold is -1; give"):
        Router.from_registry("/nonexistent/registry", route_threshold=-1)


def test_eval_routing_refuses_such_a_threshold_before_it_loads_anything(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("eval_routing", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "load_backbone", lambda *a, **k: pytest.fail("the backbone loaded"))
    for flag, value in (("--threshold", "nan"), ("--novelty", "1.5")):
        monkeypatch.setattr("sys.argv", ["eval_routing.py", "task.yaml", flag, value])
        with pytest.raises(SystemExit) as exit_:
            script.main()
        assert exit_.value.code == 2
        assert f"error: {flag} is {float(value)!r}; give a probability from 0 to 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny classification adapter (rows "pos 3", "neg 5", ...) and a copy adapter ("ab", "cd", ...)."""
    d = tmp_path_factory.mktemp("hostile")
    gen = d / "copy.jsonl"
    gen.write_text("".join(json.dumps({"text": t, "target": t.upper()}) + "\n" for t in ["ab", "cd", "ef", "gh", "ij", "kl"]))
    return {"cls_a": train_tiny(d, "cls_a"),
            "gen": train_tiny(d, "gen", type="generation", labels=None, label=None, target="target", metric=["exact_match"],
                              data={"train": str(gen), "dev": str(gen)}, prompt="In: {text}\nOut:", train={"max_new_tokens": 3})}


AUTO = [{"adapter": "auto", "text": t} for t in [f"{w} {i}" for i in range(8) for w in ("pos", "neg")] + ["cd", "ij"]]


def test_a_pinned_version_served_once_does_not_become_a_routing_target(folders, tmp_path):
    """`auto` picks among the adapters by name (each its latest version). A request pinning an older version
    (`cls_a@1.0.0`) registered that version, which joined routing beside `cls_a`: the two held the same samples, so
    the classifier split `cls_a`'s inputs between them (the old version answered some, base others), and what `auto`
    answered depended on which versions someone had asked for before."""
    from adapterhub_lite.artifacts.registry import LocalRegistry

    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(folders["cls_a"], "1.0.0")
    reg.publish(folders["cls_a"], "1.1.0")
    reg.publish(folders["gen"], "1.0.0")
    r = Router.from_registry(reg.root, dtype="fp32")
    before = r.route(AUTO)
    assert set(before) == {"cls_a", "gen"}
    assert r.run([{"adapter": "cls_a@1.0.0", "text": "pos 1"}])[0]["adapter"] == "cls_a@1.0.0"
    assert "cls_a@1.0.0" in r.known()  # served by its pinned id from now on …
    assert r.route(AUTO) == before  # … but never picked by `auto`


def test_the_fit_does_not_depend_on_the_order_adapters_were_registered_in():
    """A server that loaded an adapter at run time (last) and one restarted on the same registry (index order) know the
    same adapters in another order; their routers gave other probabilities (1e-6 apart), so a request near the threshold
    or a tie could be answered by another adapter after a restart. The classes are now the names in sorted order."""
    samples = clusters()
    samples["c"] = torch.randn(60, 8, generator=torch.Generator().manual_seed(0)) + 2
    forward, backward = ContentRouter(samples), ContentRouter({k: samples[k] for k in ["c", "b", "a"]})
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)) * 2
    assert forward.names == backward.names == ["a", "b", "c"]
    assert torch.equal(forward.probs(x), backward.probs(x)) and forward.route(x) == backward.route(x)


def test_a_tie_between_adapters_goes_to_base_whatever_their_order():
    """Two adapters with the same samples (one adapter published under two names) get the same probability: the
    classifier cannot tell which one a request is for, so the request goes to base, as below the threshold; it went to
    whichever was registered first, even at threshold 0.5 (0.5 >= 0.5)."""
    a = clusters()["a"]
    for threshold in (0.0, 0.5):
        for names in (("x", "y"), ("y", "x")):
            twins = ContentRouter({names[0]: a, names[1]: a.clone()}, threshold=threshold)
            assert twins.route(a[:3]) == [("base", 0.5)] * 3


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5])
def test_twins_beside_another_adapter_tie_whatever_the_threshold(threshold):
    """Beside a third adapter the classifier gives two adapters of the same samples probabilities equal only to lbfgs'
    precision (0.4988 and 0.4986): below 0.5 a threshold let the requests through to one twin or the other by that
    noise, each answer reading as a confident pick (fallback null), and at 0.5 they were put down to the threshold.
    They are a tie, named so, and the third adapter keeps its requests."""
    samples = clusters()
    router = ContentRouter({"x": samples["a"], "y": samples["a"].clone(), "b": samples["b"]}, threshold=threshold)
    picks = router.decide(samples["a"])
    assert {(p.adapter, p.candidate in ("x", "y"), p.runner_up in ("x", "y"), p.fallback) for p in picks} == {("base", True, True, "tie")}
    assert {p.adapter for p in router.decide(samples["b"])} == {"b"}


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # base: a column, never a true task
def test_eval_routing_reports_what_an_independent_confusion_matrix_of_its_own_routes_gives(tmp_path, monkeypatch, capsys):
    """scripts/eval_routing.py's figures, recomputed with scikit-learn from the routes it took (recorded): each task's
    `routing_accuracy` is the recall of its row of the confusion matrix (base a column of its own, counted wrong), the
    mean is the balanced accuracy, `routed_to` is the matrix, held-out and off-task figures the share sent to an adapter."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    makers = {"digits": lambda i: f"{i * 7919 % 100000:05d} {i % 13}", "letters": lambda i: "qwertyuiop"[i % 10] * (3 + i % 5)}
    paths = []
    for name, make in makers.items():
        for split, rows in (("train", range(40)), ("dev", range(40, 53))):
            (tmp_path / f"{name}_{split}.jsonl").write_text("".join(json.dumps({"text": make(i), "label": "x"}) + "\n" for i in rows))
        spec = {"name": name, "type": "classification", "prompt": "{text} ->", "label": "label", "labels": ["x", "y"],
                "data": {"train": str(tmp_path / f"{name}_train.jsonl"), "dev": str(tmp_path / f"{name}_dev.jsonl")}}
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(json.dumps(spec))  # JSON is YAML
    (tmp_path / "ood.txt").write_text("What is the capital of Australia?\n\nWie spät ist es?\n12345 6\n")
    spec = importlib.util.spec_from_file_location("eval_routing", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    routed = []  # (the router's adapters, its routes) for every route() the script makes, in order

    class Recording(ContentRouter):
        def route(self, vectors):
            out = super().route(vectors)
            routed.append((tuple(self.names), [r for r, _ in out]))
            return out
    monkeypatch.setattr(script, "ContentRouter", Recording)
    monkeypatch.setattr("sys.argv", ["eval_routing.py", *map(str, paths), "--base", "tiny-random-llama", "--quantization", "none",
                                     "--samples", "40", "--threshold", "0.9", "--ood", str(tmp_path / "ood.txt")])
    script.main()
    report = json.loads(capsys.readouterr().out)
    both = ("digits", "letters")
    (names_d, digits), (names_l, letters), (held_d, to_d), (held_l, to_l), (names_o, ood) = routed
    assert names_d == names_l == names_o == both and held_d == ("letters",) and held_l == ("digits",)
    truth, pred = ["digits"] * len(digits) + ["letters"] * len(letters), digits + letters
    labels = [*both, "base"]
    matrix = confusion_matrix(truth, pred, labels=labels)
    for i, task in enumerate(both):
        assert report["routing_accuracy"][task] == round(matrix[i, i] / matrix[i].sum(), 4)
        assert report["routed_to"][task] == {label: int(n) for label, n in zip(labels, matrix[i]) if n}
    assert report["routing_accuracy"]["mean"] == round(balanced_accuracy_score(truth, pred), 4)
    assert report["held_out_to_adapter"] == {"digits": round(sum(r != "base" for r in to_d) / 13, 4),
                                             "letters": round(sum(r != "base" for r in to_l) / 13, 4),
                                             "mean": round((sum(r != "base" for r in to_d) + sum(r != "base" for r in to_l)) / 26, 4)}
    assert report["ood_to_adapter"] == {"inputs": 3, "to_adapter": round(sum(r != "base" for r in ood) / 3, 4)}


def test_serving_a_pinned_version_keeps_the_fitted_router(folders, tmp_path):
    """The router is refitted whenever a routing target is added or dropped (seconds for a few adapters, on the engine
    thread, before the next `auto` request); a pinned version is none, so serving one (or forgetting it) refits nothing."""
    from adapterhub_lite.artifacts.registry import LocalRegistry

    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(folders["cls_a"], "1.0.0")
    reg.publish(folders["cls_a"], "1.1.0")
    reg.publish(folders["gen"], "1.0.0")
    r = Router.from_registry(reg.root, dtype="fp32")
    r.route(AUTO)
    fitted = r._content
    r.run([{"adapter": "cls_a@1.0.0", "text": "pos 1"}])
    r.forget("cls_a@1.0.0")
    assert r._content is fitted
    r.forget("gen")  # a routing target: refitted without it
    assert r._content is None and "gen" not in r.route(AUTO)


@pytest.mark.parametrize("text", [" ", "\n\t  "])
def test_an_auto_request_of_whitespace_alone_is_refused_wherever_routing_sends_it(folders, text):
    """Whitespace holds no task input. Named adapters refuse it (their template would hold nothing) and an empty text is
    refused as an empty prompt, but `auto` sent it where the classifier pointed: on the tiny backbone to base, which
    answered it (200, an empty completion); with SmolLM2 to sst2, refused for an empty 'sentence' the request never sent."""
    from adapterhub_lite.core.errors import DataError

    r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    for name, folder in folders.items():
        r.register(name, folder)
    with pytest.raises(DataError, match=r"^run\(\): requests\[1\] \(adapter 'auto'\): an 'auto' request's text is only whitespace \(" + re.escape(repr(text))):
        r.run([{"adapter": "auto", "text": "pos 3"}, {"adapter": "auto", "text": text}])
    assert r.run([{"adapter": "base", "text": text, "max_new_tokens": 1}])[0]["adapter"] == "base"  # a raw text to base is its own


def test_auto_rows_route_alike_alone_in_a_mixed_batch_and_from_several_threads(folders):
    """What held when probed (no fix): an `auto` row gets the adapter and answer it gets alone whether it shares a batch
    with other `auto` rows and rows naming their adapter, runs on a router fitted afresh (a restart), or runs while
    other threads call the same Router with such batches."""
    import threading

    def router():
        r = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
        for name, folder in folders.items():
            r.register(name, folder)
        return r

    r = router()
    mixed = [AUTO[0], {"adapter": "gen", "text": "ab"}, AUTO[-1], {"adapter": "cls_a", "text": "neg 2"}, AUTO[1],
             {"adapter": "base", "text": "hello", "max_new_tokens": 2}, {"adapter": "auto", "text": "Wie spät ist es?"}]
    alone = [r.run([row])[0] for row in mixed]
    assert [a["adapter"] for a in alone] == ["cls_a", "gen", "gen", "cls_a", "cls_a", "base", "base"]
    assert r.run(mixed) == alone and router().run(mixed) == alone
    seen, errors = [], []

    def work():
        try:
            for _ in range(3):
                seen.append(r.run(mixed[::-1])[::-1])
                seen.append([{"adapter": n} for n in r.route(mixed)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 24
    assert all(s in (alone, [{"adapter": a["adapter"]} for a in alone]) for s in seen)
