"""What each OpenAI route does with a request: fields checked, choices made into engine jobs, then answered
(gathered or streamed: serving/answers.py, the handlers' answering side).

How a request becomes a prompt:
- `prompt` (a string, token ids, or a list of either) is used as given and continued through the
  adapter's weights, whatever its task (`stop`, `max_tokens` default 16, `echo`, … apply).
- `input` (the task's columns, or one string) renders the adapter's own prompt template, exactly
  as `adapterhub-lite infer`, and the answer is the task's answer (first line, stripped).
  `auto` always treats its text as the task's input, since the adapter it picks brings its template.
- chat: a task adapter reads the last user message as its input; `base` (and a task-less
  adapter) applies the tokenizer's chat template to the whole conversation.
- A classification adapter's task input is scored over its labels, never generated: the
  completion's text is the label, and /v1/classify also returns every label's probability.

Each request's `access` dict is filled as it is read (id, model, …: here) and answered (adapter, tokens:
answers.py's `note`), and written to the access log by the app's middleware (serving/api.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from adapterhub_lite.core.data import render, request_row
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.names import AUTO, BASE
from adapterhub_lite.serving import protocol as P
from adapterhub_lite.serving.answers import Answers, Request, as_api_error
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.jobs import Job
from adapterhub_lite.serving.params import IGNORED_HEADER, MAX_N, C, H, SamplingParams, check_fields, flag, number, sampling_params, shown_name, unread
from adapterhub_lite.serving.runtime import Catalogue

log = logging.getLogger("adapterhub_lite.serve")  # the logger's name predates the serving package: users configure it


@dataclass
class Settings:
    """The server's limits and switches (see `adapterhub-lite serve --help`)."""

    max_input_tokens: int | None = None  # None: the model's context is the only limit
    max_tokens: int | None = None  # None: the model's context is the only limit (as vLLM)
    request_timeout: float = 120.0
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    allow_runtime_loading: bool = False
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: off


# What /v1/classify reads; any other field is ignored aloud (a log line and the response header), as on the other routes.
CLASSIFY_FIELDS = ("model", "input", "merged_adapters", "user", "safety_identifier")


def check_task_special_tokens(body: dict, where: str) -> None:
    """Refuse (400) `add_special_tokens: false` for a task's input: the adapter's template is tokenized as its training
    read it, with the tokenizer's special tokens, whatever the field says (it was dropped silently)."""
    if body.get("add_special_tokens") is False:
        raise P.bad("add_special_tokens", False, "a task's input is read as its adapter was trained on it, with the tokenizer's special "
                    f"tokens; drop it, or send the rendered prompt as {where} to choose")


class Handlers(Answers):
    """The routes' work, over one engine, its catalogue and the server's settings."""

    def __init__(self, engine: Engine, settings: Settings, catalogue: Catalogue):
        self.engine, self.settings, self.catalogue = engine, settings, catalogue
        self.router = engine.router
        self.tokenizer = self.router.backbone.tokenizer
        self.vocab = self.router.bank.lm_head.out_features

    # -- shared steps ----------------------------------------------------------------------------
    def fields(self, body: dict, endpoint: str, access: dict, known=None) -> None:
        """Refuse refused fields; log and report (response header) the ones this endpoint does not read: by the field
        table for completions and chat, or those not in `known`."""
        self.ignore_aloud(check_fields(body, endpoint) if known is None else unread(body, known), f"v1/{endpoint}", access)
        for key in ("user", "safety_identifier"):
            if body.get(key) is not None and not isinstance(body[key], str):  # it would go unlogged: OpenAI takes a string
                raise P.bad(key, body[key], "give a string (it is written to the access log), or leave it out")
            if isinstance(body.get(key), str):
                access[key] = shown_name(body[key][:64])  # one key=value of the access line, whatever the client wrote

    @staticmethod
    def ignore_aloud(names: list[str], route: str, access: dict) -> None:
        """Ignore aloud what a route does not read (fields, or chat messages): one log line, and the names added to the
        IGNORED_HEADER response header, as vLLM ignores unknown fields but said."""
        if names:
            names = [shown_name(n) for n in names]  # a client's names: no CR/LF into a header or a log line
            log.warning("ignored %s: not read by /%s (named in the %s response header)", ", ".join(names), route, IGNORED_HEADER)
            access["ignored"] = [*access.get("ignored", []), *names]

    async def resolve_model(self, body: dict) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise P.bad("model", model, "name an adapter (see GET /v1/models), 'base' or 'auto'")
        merged = body.get("merged_adapters")
        if merged is not None:
            return await self.catalogue.merged(merged, model)
        return await self.catalogue.ensure_known(model)

    def request_id(self, body: dict, prefix: str, header: str | None = None, access: dict | None = None) -> str:
        """The response id: `prefix-` + the client's X-Request-Id header (`header`) or `request_id` field, or a random
        one. vLLM reads the header first (`vllm bench serve` sends one with every request); a `request_id` field
        that then goes unread is named in the ignored-fields header."""
        given, name = body.get("request_id"), "request_id"
        if header is not None:
            if given is not None and given != header and access is not None:
                self.ignore_aloud(["request_id"], "v1/completions and v1/chat/completions (the X-Request-Id header names the request, as vLLM reads it)", access)
            given, name = header, "X-Request-Id (header)"
        if given is None:
            return P.new_id(prefix)
        if not isinstance(given, str) or not given or len(given) > 128 or not given.isprintable():
            raise P.bad(name, given, "give a printable string of up to 128 characters")
        return f"{prefix}-{given}"

    def make_request(self, rid: str, model: str, body: dict, params: SamplingParams, requests: list[dict], chat: bool, *,
                     answer: bool, default_max: int, fill_context: bool = False, add_special_tokens: bool = True) -> Request:
        """n jobs per router request (choice i of a seeded request draws with seed + i), sharing one event queue."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        n = number(body, "n", 1, 1, MAX_N, int)
        truncate = number(body, "truncate_prompt_tokens", None, 1, self.router.max_model_len, int)
        deadline = time.monotonic() + self.settings.request_timeout
        jobs = []
        for request in requests:
            for i in range(n):
                index = len(jobs)
                seed = None if params.seed is None else params.seed + i
                jobs.append(Job({"adapter": model, **request},
                                lambda ev, payload, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, ev, payload)),
                                params=params.with_seed(seed), answer_mode=answer, default_max_tokens=default_max, fill_context=fill_context,
                                max_input_tokens=self.settings.max_input_tokens, add_special_tokens=add_special_tokens,
                                truncate_prompt_tokens=truncate, deadline=deadline))
        return Request(rid, model, body, params, jobs, events, chat, n)

    def submit(self, req: Request) -> None:
        """Queue every job of a request, or none (a full queue: 429, and no sibling choice queued for nobody)."""
        try:
            self.engine.submit(*req.jobs)
        except AdapterHubError as exc:
            raise as_api_error(exc) from None

    async def _begin(self, body: dict, endpoint, prefix: str, http):
        """What both generation routes do first: check the fields, name the request and its model (both into the
        access line), and read its sampling settings. Returns (access, request id, model, SamplingParams)."""
        access = http.state.access
        self.fields(body, endpoint, access)
        rid = access["id"] = self.request_id(body, prefix, http.headers.get("x-request-id"), access)
        model = access["model"] = await self.resolve_model(body)
        params = sampling_params(body, endpoint, vocab=self.vocab,
                                 # no --max-tokens: the context check names prompt + max_tokens against it
                                 max_tokens_limit=self.settings.max_tokens or 1 << 31)
        opts = body.get("stream_options") or {}
        if opts.get("continuous_usage_stats") and not opts.get("include_usage"):  # vLLM reads it only beside include_usage
            self.ignore_aloud(["stream_options.continuous_usage_stats"], f"v1/{endpoint} (it applies with include_usage: true)", access)
        return access, rid, model, params

    # -- /v1/completions -------------------------------------------------------------------------
    async def completions(self, body: dict, http):
        """POST /v1/completions: a raw `prompt` (continued as given) or a task's `input` (its answer)."""
        access, rid, model, params = await self._begin(body, C, "cmpl", http)
        raw_only = [k for k in ("echo", "min_tokens", "ignore_eos") if body.get(k) not in (None, False, 0)]
        if ("input" in body or model == AUTO) and raw_only:  # a task's answer is its first line, stripped: not a continuation to echo or lengthen
            raise P.bad(raw_only[0], body[raw_only[0]], "applies to a raw `prompt` sent to a named adapter; a task's `input` (and 'auto') "
                        "is answered with the task's answer — send the rendered prompt as `prompt` to use it")
        if "input" in body or model == AUTO:
            check_task_special_tokens(body, "`prompt`")
        if "input" in body:
            # one of them would go unread; an empty prompt is what a client must send beside `input`: "" (the openai client) or
            # [""] (LangChain's OpenAI, which always sends its prompts as a list)
            if body.get("prompt") not in (None, "", [], [""]):
                raise P.bad("prompt", body["prompt"], "give either a raw `prompt` (continued as given) or the task's `input` (its answer), not both; "
                            "with `input`, leave `prompt` empty")
            raw = body["input"]
            requests, answer = [P.task_input(x, model) for x in (raw if isinstance(raw, list) and raw else [raw])], True
        else:
            if body.get("prompt") is None:
                raise P.bad("prompt", None, "give a prompt (or the task's columns as `input`)")
            requests, answer = P.prompts(body["prompt"], self.vocab), False
            if model == AUTO:  # routed by content: each prompt is the task's input text
                if any("prompt_ids" in r for r in requests):
                    raise P.bad("prompt", body["prompt"], "'auto' routes by text: send the prompt as a string")
                requests, answer = [{"text": r["prompt"]} for r in requests], True
        # a raw prompt gets OpenAI's default of 16 new tokens; a task input its task's budget (32 without a task, as `infer`)
        req = self.make_request(rid, model, body, params, requests, chat=False, answer=answer, default_max=32 if answer else 16,
                                add_special_tokens=flag(body, "add_special_tokens", True))
        return await self.answer(req, http)

    # -- /v1/chat/completions --------------------------------------------------------------------
    async def chat(self, body: dict, http):
        """POST /v1/chat/completions: a task adapter answers the last user message; `base` continues the chat template."""
        access, rid, model, params = await self._begin(body, H, "chatcmpl", http)
        if body.get("max_completion_tokens") is not None and body.get("max_tokens") not in (None, body["max_completion_tokens"]):
            self.ignore_aloud(["max_tokens"], "v1/chat/completions (max_completion_tokens is read instead, as vLLM does)", access)
        if params.prompt_logprobs is not None and flag(body, "stream", False):  # no chat chunk carries them: refused, not dropped
            raise P.bad("prompt_logprobs", body["prompt_logprobs"], "a chat stream does not carry prompt log-probs (vLLM refuses them in any "
                        "stream); ask without stream, or on /v1/completions, whose stream carries them")
        messages = P.check_messages(body.get("messages"))
        self.ignore_aloud(P.unread_message_keys(body["messages"]), "v1/chat/completions", access)
        add_generation = flag(body, "add_generation_prompt", True)
        continue_final = flag(body, "continue_final_message", False)
        if model == BASE or not self.catalogue.has_task(model):
            if not getattr(self.tokenizer, "chat_template", None):
                raise P.ApiError(400, f"model {model!r} has no task and the backbone's tokenizer has no chat template; use /v1/completions with a prompt")
            if add_generation and continue_final:
                raise P.bad("continue_final_message", True, "it continues the last message, so set add_generation_prompt: false with it")
            if continue_final and messages[-1]["role"] != "assistant":
                raise P.bad("continue_final_message", True, "the last message must be the assistant's, to be continued")
            text, unread_names = P.render_chat(self.tokenizer, messages, add_generation_prompt=add_generation, continue_final_message=continue_final)
            self.ignore_aloud(unread_names, "v1/chat/completions (the chat template does not read them)", access)
            req = self.make_request(rid, model, body, params, [{"prompt": text}], chat=True, answer=False, default_max=self.settings.max_tokens or self.router.max_model_len,
                                    fill_context=True, add_special_tokens=flag(body, "add_special_tokens", False))
        else:
            for name, (value, usual) in {"min_tokens": (params.min_tokens, 0), "ignore_eos": (params.ignore_eos, False)}.items():
                if value != usual:
                    raise P.bad(name, value, f"adapter {model!r} answers its task from the last user message (its own template, its first line); "
                                "this applies to 'base' chat only")
            text = self.task_message(body, model, messages, access, "v1/chat/completions")
            req = self.make_request(rid, model, body, params, [{"text": text}], chat=True, answer=True, default_max=32)
        return await self.answer(req, http)

    def task_message(self, body: dict, model: str, messages: list[dict], access: dict, route: str) -> str:
        """What a task adapter reads of a chat (its chat answer, and /tokenize's count of it): the last user message's
        content, as its task's input; the template settings of 'base' chat are refused, the other messages named aloud."""
        for name, (value, usual) in {"continue_final_message": (flag(body, "continue_final_message", False), False),
                                     "add_generation_prompt": (flag(body, "add_generation_prompt", True), True)}.items():
            if value != usual:
                raise P.bad(name, value, f"adapter {model!r} answers its task from the last user message (its own template, its first line); "
                            "this applies to 'base' chat only")
        check_task_special_tokens(body, "`prompt` to /v1/completions")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise P.bad("messages", body.get("messages"), f"a task adapter ({model}) reads the last user message as its input; add one")
        # a system prompt, earlier turns and the speaker's name are not read by a task's template: said, not dropped silently
        unread = [f"messages[{i}]" for i in range(len(messages)) if i != users[-1]]
        if "name" in messages[users[-1]]:
            unread.append(f"messages[{users[-1]}].name")
        self.ignore_aloud(unread, f"{route} (adapter {model!r} answers the last user message's content only)", access)
        return messages[users[-1]]["content"]

    def task_prompt(self, model: str, text: str) -> str:
        """The prompt a task adapter reads for one input text: its own template filled, as the engine renders it."""
        spec = self.router.spec(model)
        try:
            return render(spec, request_row(spec, {"text": text})) if spec else text
        except AdapterHubError as exc:  # a template of several columns: a chat's one text cannot fill it
            raise as_api_error(exc) from None

    # -- /v1/classify ----------------------------------------------------------------------------
    async def classify(self, body: dict, http) -> dict:
        """POST /v1/classify: a classification adapter's label and every label's probability, per input."""
        access = http.state.access
        self.fields(body, "classify", access, known=CLASSIFY_FIELDS)
        model = access["model"] = await self.resolve_model(body)
        if not self.catalogue.is_classifier(model):
            raise P.bad("model", model, "/v1/classify takes a classification adapter (see GET /v1/models); use /v1/completions for others")
        raw = body.get("input")
        inputs = [P.task_input(x, model) for x in (raw if isinstance(raw, list) and raw else [raw])]
        req = self.make_request(P.new_id("cls"), model, {}, SamplingParams(), inputs, chat=False, answer=True, default_max=32)
        access["id"] = req.rid
        self.submit(req)
        results = await self.results(req, http)
        self.note(access, results)
        # vLLM's classify response (id, created, per input `probs` over the labels in order and `num_classes`), with
        # the label names beside them (`probabilities`) and the adapter that answered
        return {"id": req.rid, "object": "list", "created": int(time.time()), "model": model, "usage": P.usage(results),
                "data": [{"index": i, "label": r.label, "adapter": r.adapter, "probabilities": {k: round(v, 6) for k, v in r.probabilities.items()},
                          "probs": [round(v, 6) for v in r.probabilities.values()], "num_classes": len(r.probabilities)}
                         for i, r in enumerate(results)]}
