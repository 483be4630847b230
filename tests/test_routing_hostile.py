"""Content routing (`auto`) under hostile settings and catalogues: thresholds that are no probability, pinned
versions beside their latest, adapters registered in another order or indistinguishable from each other."""

import importlib.util
import math
from pathlib import Path

import pytest

from adapterhub_lite.artifacts.samples import RoutingError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.routing import ContentRouter

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
