"""vLLM's own OpenAI-server tests (tests/entrypoints/openai/), replayed against our server where they apply.

Each test names the vLLM test whose expectation it holds (status codes, error shapes), written anew here.
"""

import httpx
import openai
import pytest

from .serving import KEY


def test_load_lora_adapter_from_a_missing_path_is_404(served, tmp_path):
    """vLLM's test_dynamic_lora_not_found: a lora_path with nothing there is a NotFoundError (404);
    a path that is there but is no adapter folder stays a 400 (test_dynamic_lora_invalid_files)."""
    with pytest.raises(openai.NotFoundError) as err:
        served.client.post("load_lora_adapter", cast_to=str, body={"lora_name": "notfound", "lora_path": "/not/an/adapter"})
    assert err.value.body["param"] == "lora_path" and "/not/an/adapter" in err.value.body["message"]
    afile = tmp_path / "adapter_config.json"
    afile.write_text("this is not json")
    for path in (str(afile), str(tmp_path)):
        with pytest.raises(openai.BadRequestError):
            served.client.post("load_lora_adapter", cast_to=str, body={"lora_name": "invalid", "lora_path": path})
    assert "notfound" not in [m.id for m in served.client.models.list().data]


@pytest.mark.parametrize("method, path, status, allow", [("POST", "/v1/nope", 404, None), ("GET", "/v1/completions", 405, "POST"),
                                                          ("POST", "/v1/models", 405, "GET")])
def test_unknown_route_or_method_answers_in_the_error_shape(served, method, path, status, allow):
    """vLLM answers a route or method it does not have in its error shape ({"error": {message, type, code, param}},
    its HTTPException handler), as OpenAI does; Starlette's own {"detail": "Not Found"} has no error.message to read."""
    r = httpx.request(method, served.url + path, json={} if method == "POST" else None, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and path in error["message"]
    assert r.headers.get("allow") == allow


def test_truncation_side_right_is_refused_left_is_what_is_done(served):
    """vLLM's test_completion_truncation_side_controls_prompt_truncation: "right" keeps the first k tokens. We keep the
    last k (vLLM's "left"), so "right" is a 400 naming it rather than an answer to another prompt than the one asked."""
    body = {"model": "base", "prompt": list(range(8)), "max_tokens": 1, "temperature": 0, "return_token_ids": True, "truncate_prompt_tokens": 4}
    r = served.post("/v1/completions", {**body, "truncation_side": "right"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncation_side"
    r = served.post("/v1/completions", {**body, "truncation_side": "left"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["prompt_token_ids"] == [4, 5, 6, 7]
