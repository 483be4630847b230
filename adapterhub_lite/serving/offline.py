"""The engine driven to the end on the calling thread: `Engine.run`, for `Router.run` and `adapterhub-lite infer`.

Offline use, as vLLM's `LLM.generate` drives its engine: the same scheduler, budgets, batch and steps as the
server's (serving/engine.py), with no thread, no HTTP and no client that can leave. A mixin of the Engine, as
admission.py is: it feeds the engine's arrivals queue and runs its steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from adapterhub_lite.core.errors import AdapterHubError, DataError
from adapterhub_lite.core.numbers import is_count
from adapterhub_lite.serving.jobs import Job, bad_budgets, unread_settings
from adapterhub_lite.serving.params import SamplingParams


class OfflineRun:
    """Engine.run (the Engine provides the queue, `_serve_once`, `_drop_all` and the router this reads)."""

    def run(self, requests: list[dict], max_new_tokens: int = 32, on_done: Callable[[int], None] | None = None) -> list[dict]:
        """Serve `requests` to the end on the calling thread (offline use, as vLLM's LLM.generate drives its engine):
        the server's scheduler, budgets and batch, greedy, each answer reported as the task's answer.

        Each request names its adapter ("base", "auto" or a known name) and decodes up to its own `max_new_tokens`
        when it sets one, as the server's `max_tokens` applies to a task's input; else a task adapter's input gets its
        task's max_new_tokens, and a raw prompt, `base` and task-less adapters get `max_new_tokens`. Returns, in order, {"adapter": the adapter that served it,
        "prediction": the label word or the answer's first line}, and for an `auto` request "routing" (Routing.as_dict:
        the classifier's confidence, its candidate and runner-up, why base answered); `on_done(i)` is called as request i ends.
        A request that fails raises its error once the others have ended (the first failing one in order; its index
        in `requests` is the error's `request_index`).
        """
        if self._thread.is_alive():
            raise RuntimeError("this engine serves on its thread; submit jobs to it, or run() on an engine that was not started")
        if not isinstance(requests, (list, tuple)):  # a dict or a string would be iterated as keys or characters
            raise DataError(f"run() takes a list of requests, got {type(requests).__name__} {_shown(requests)}; "
                            "pass a list of dicts such as [{'adapter': 'base', 'text': 'Hello'}]")
        if on_done is not None and not callable(on_done):  # it was called on the engine thread: a traceback per request, answers kept
            raise AdapterHubError(f"on_done is {_shown(on_done)}, not callable; pass a function of the request's index, or None")
        vocab = self.router.bank.lm_head.out_features
        for i, req in enumerate(requests):  # before any job: Python callers reach here unchecked (the server parsed its own)
            problem = malformed(req, vocab)
            if problem:
                err = DataError(problem)
                err.request_index = i
                raise err
        # checked before any job is made: an unusable budget would wait for tokens that never come (a hang), not fail
        bad = bad_budgets(requests, max_new_tokens)
        if bad:
            raise AdapterHubError(f"request(s) {[i for i, _ in bad][:5]} ask for max_new_tokens {bad[0][1]!r}; give a whole number ≥ 1 "
                                  "(or leave it out: a task's own budget, else the default)")
        unread = unread_settings(requests)
        if unread:
            raise AdapterHubError(f"request(s) {unread[0][:5]} set {unread[1]}, which run() does not read (it answers greedily, each task "
                                  "within its own budget); give 'max_new_tokens' for a budget, and drop the rest")
        for i, req in enumerate(requests):  # before any job: an ambiguous row would be answered as something else
            clash = self.router.column_clash(req)
            if clash:
                err = DataError(clash)
                err.request_index = i
                raise err
        out: list[dict | None] = [None] * len(requests)
        errors: dict[int, Exception] = {}
        ended = 0

        def listener(i: int):
            def hear(event: str, payload) -> None:
                nonlocal ended
                if event == "done":
                    out[i] = {"adapter": payload.adapter, "prediction": payload.label if payload.label is not None else payload.text}
                    if payload.routing is not None:  # an `auto` row: how its adapter was chosen, to audit routing by
                        out[i]["routing"] = payload.routing.as_dict()
                elif event == "error":
                    errors[i] = payload
                if event in ("done", "error"):
                    ended += 1
                    if on_done is not None:
                        on_done(i)
            return hear
        # a request's own max_new_tokens is its budget whatever answers it (the task's budget was used for a task's input,
        # silently: a row asking for 8 new tokens got the task's 4); without one, a task's own, else max_new_tokens
        pending = deque(Job(req, listener(i), SamplingParams(max_tokens=req.get("max_new_tokens")), answer_mode=True,
                            default_max_tokens=max_new_tokens)
                        for i, req in enumerate(requests))
        try:
            while ended < len(requests):
                # requests are read as the queue has room (its bound, as for the server's clients): a file of 100,000
                # requests is not tokenized, nor held as tickets, all at once
                for _ in range(min(len(pending), self.max_queue - self.queue_depth)):  # queue_depth walks the queue: once a step
                    self._waiting.put_nowait(pending.popleft())
                self._serve_once()
        except BaseException:
            # the caller stopped (Ctrl-C, or its on_done raised), maybe part-way through a step: this run's requests leave
            # with it, and the batch goes whole (a cut step may have answered a row without taking it out), so the next
            # run starts idle instead of decoding them on, or failing on that batch
            with self.router.lock:
                self._drop_all()
                self._static = None
            raise
        if errors:
            first = min(errors)
            errors[first].request_index = first  # which request failed (infer names its line: one bad row of a long file)
            raise errors[first]
        return out


def _shown(value) -> str:
    """A value as a one-line message shows it: its repr, cut to 60 characters."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def malformed(request, vocab: int) -> str | None:
    """Why `request` is no request run() can serve (None when it is one): a dict whose `adapter` is a string, whose raw
    `prompt` is a string and whose `prompt_ids` are token ids of this model. Each came out of the engine as the
    library's own error (AttributeError: 'str' object has no attribute 'get', the tokenizer's OverflowError, the
    embedding's IndexError) rather than a line naming the request's field; the server checks the same in its parser."""
    if not isinstance(request, dict):
        return (f"the request is {type(request).__name__} {_shown(request)}, not a dict; give each request as a dict "
                "such as {'adapter': 'base', 'text': 'Hello'}")
    if "adapter" in request and not isinstance(request["adapter"], str):
        return f"'adapter' is {_shown(request['adapter'])}, not a string; name an adapter, 'base' or 'auto'"
    if "prompt" in request and not isinstance(request["prompt"], str):
        return f"'prompt' is {_shown(request['prompt'])}, not a string; give the raw prompt as text (or its token ids as 'prompt_ids')"
    if "prompt" in request and "prompt_ids" in request:  # prompt_ids was continued and the text dropped, unsaid
        return "it gives both 'prompt' and 'prompt_ids'; give the raw prompt once, as text or as token ids"
    if "prompt_ids" in request:
        ids = request["prompt_ids"]
        if not isinstance(ids, list) or not all(is_count(t) for t in ids):
            return f"'prompt_ids' is {_shown(ids)}; give a list of whole-number token ids"
        outside = [t for t in ids if not 0 <= t < vocab]
        if outside:
            return f"'prompt_ids' holds token id {outside[0]}, outside this model's vocabulary [0, {vocab}); give ids the tokenizer made"
    return None
