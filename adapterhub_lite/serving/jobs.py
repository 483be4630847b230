"""What the engine serves: a Job (one choice in flight, with its listener), what it reports (PromptPart, Result),
and the errors a request meets in the queue (full, shutting down, timed out)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.numbers import is_count
from adapterhub_lite.serving.decoding import PromptScores
from adapterhub_lite.serving.metrics import RequestTimes
from adapterhub_lite.serving.output import Entry, TextState
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.reading import Prepared
from adapterhub_lite.serving.routing import Routing

# Request keys that read like generation settings (OpenAI's, vLLM's, HF generate's). The offline entry points (Router.run,
# infer) answer greedily within each task's budget and read none of them: a request that sets one is refused, as
# answering it unapplied would look as if it had been applied. (Router.run reads a raw "prompt"; infer refuses it too.)
UNREAD_REQUEST_KEYS = frozenset({"max_tokens", "max_completion_tokens", "max_length", "temperature", "top_p", "top_k", "min_p", "stop",
                                 "stop_token_ids", "n", "seed", "logprobs", "stream", "model", "messages", "do_sample",
                                 "repetition_penalty"})


def bad_budgets(requests: list[dict], default) -> list[tuple[int, object]]:
    """(index, value) of each request whose max_new_tokens (its own, else `default`) is not a whole number ≥ 1."""
    budgets = [(i, req.get("max_new_tokens", default)) for i, req in enumerate(requests)]
    return [(i, n) for i, n in budgets if not (is_count(n) and n >= 1)]


def unread_settings(requests: list[dict], also: frozenset = frozenset()) -> tuple[list[int], list[str]] | None:
    """(indexes, sorted keys) of the requests that set a generation setting the offline entry points do not read (or a
    key of `also`, which the caller does not read either)."""
    found = [(i, set(r) & (UNREAD_REQUEST_KEYS | also)) for i, r in enumerate(requests)]
    found = [(i, keys) for i, keys in found if keys]
    return ([i for i, _ in found], sorted(set().union(*(k for _, k in found)))) if found else None


class QueueFull(AdapterHubError):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class ShuttingDown(AdapterHubError):
    """The server is stopping and takes no new requests (HTTP 503)."""


class RequestTimeout(AdapterHubError):
    """The request ran past the server's request timeout (HTTP 504)."""


@dataclass
class Job:
    """One choice in flight. `listener(event, payload)` is called from the engine thread with
    ("accepted", None) once the request was read and queued (routed, tokenized, within the context;
    a request refused while being read gets ("error", exception) instead), ("prompt", PromptPart)
    for an echoed or scored prompt, ("token", (text, [Entry])) as the choice grows, then
    ("done", Result) or ("error", exception)."""

    request: dict  # the router request: {"adapter", "prompt" | "prompt_ids" | "text" | task columns}
    listener: Callable[[str, object], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    answer_mode: bool = False  # task-aware input: report the task's answer (first line, stripped), as infer does
    default_max_tokens: int = 16  # a raw prompt's budget when params.max_tokens is None (OpenAI's default)
    fill_context: bool = False  # …and fewer when the context holds fewer (chat on `base`, as OpenAI)
    max_input_tokens: int | None = None  # longer prompts are refused (the server's limit)
    add_special_tokens: bool = True  # tokenize a text prompt with the tokenizer's special tokens
    truncate_prompt_tokens: int | None = None  # the client asked to keep only the prompt's last k tokens
    deadline: float | None = None  # time.monotonic() after which the request times out
    # filled by the engine
    times: RequestTimes = field(default_factory=RequestTimes)  # arrival (now), then what the latency histograms measure
    prepared: Prepared | None = None
    routing: Routing | None = None  # how `auto` chose the adapter (None: the request named it)
    state: TextState | None = None
    prompt: PromptPart | None = None
    cancelled: bool = False
    finished: bool = False  # answered (done or error): nothing more is sent
    generator: torch.Generator | None = None
    filling: object = None  # a long prompt's Decoding while its pieces run (chunked prefill)

    def cancel(self) -> None:
        """Ask the engine to drop this row at its next step (client gone)."""
        self.cancelled = True

    @property
    def tokens(self) -> list[int]:
        return self.state.tokens if self.state else []

    @property
    def prompt_ids(self) -> list[int]:
        return self.prepared.ids


@dataclass
class PromptPart:
    """A prompt as read, with its tokens' entries (echo: log-probs of each token given the ones before)
    and vLLM's prompt_logprobs; each is None unless asked for."""

    text: str
    entries: list[Entry] | None = None
    scores: PromptScores | None = None


@dataclass
class Result:
    adapter: str
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    label: str | None = None  # classification
    probabilities: dict[str, float] | None = None
    entries: list[Entry] | None = None  # per generated token, when logprobs were asked for
    prompt: PromptPart | None = None
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended the choice
    routing: Routing | None = None  # an `auto` request's: how its adapter was chosen
