"""A request read for an adapter: its adapter picked (`auto` by content), its prompt made into ids and measured
against the context (`prepare` → Prepared), and classification rows scored over their labels.

The request side of the AdapterManager (a mixin of it, as Admission is of the Engine): what the engine calls for
each arrival and each classification batch. The manager (serving/manager.py) owns the state these methods read:
`backbone`, `bank`, `lock`, the catalogue (`folders`, `metas`, `spec`, `_check_known`, `virtual_tokens`),
`max_model_len`, `route_threshold` and the fitted content router (`_content`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from adapterhub_lite.artifacts.samples import RoutingError, embed, embedding_spec, load_routing
from adapterhub_lite.core.data import raw_text, render, request_row
from adapterhub_lite.core.errors import LABEL_NEED, ContextLengthError, DataError, over_context
from adapterhub_lite.core.names import AUTO, BASE
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.model.heads import keep_end, label_plan_ids, label_token_ids
from adapterhub_lite.serving.protocol import ENGINE_KEYS
from adapterhub_lite.serving.routing import ContentRouter, Routing


def _locked(method):
    """Run a method under the manager's lock: the backbone's per-row layers read one slot assignment at a
    time (RowContext), and residency changes must not evict what another caller's batch is using, so calls from
    several threads take turns (the engine takes the same lock for each of its steps)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return call


class RequestReader:
    """Routing, prompt reading and classification scoring (a mixin of AdapterManager, which holds the state)."""

    def route(self, requests: list[dict]) -> list[str]:
        """Each request's adapter name, `auto` resolved by content (one embedding pass for all of them)."""
        return [r.get("adapter", BASE) if how is None else how.adapter for r, how in zip(requests, self.routed(requests))]

    @_locked
    def routed(self, requests: list[dict]) -> list[Routing | None]:
        """How each `auto` request is routed by content (Routing: its adapter, the classifier's confidence …), None for a
        request naming its adapter; one embedding pass for all of them."""
        auto = [i for i, r in enumerate(requests) if r.get("adapter", BASE) == AUTO]
        out: list[Routing | None] = [None] * len(requests)
        if auto:
            if self._content is None:
                self._content = self._fit_content_router()
            with self.bank.base_only():
                vectors = embed(self.backbone.model, self.backbone.tokenizer, [raw_text(requests[i]) for i in auto])
            for i, how in zip(auto, self._content.decide(vectors)):
                out[i] = how
        return out

    @staticmethod
    def routing_target(name: str) -> bool:
        """Whether `auto` may pick adapter `name`: adapters are picked by name, so a pinned version (`name@version`,
        registered when a request names it) is served to whoever names it and is none; what `auto` answers then does not
        depend on which versions were asked for before (beside its own latest, with the same samples, it would split
        that adapter's inputs between old and new, or send them to base), and registering one refits nothing."""
        return "@" not in name

    def _fit_content_router(self) -> ContentRouter:
        """Fit `auto` routing over every routing target whose routing data fits this backbone's embedding."""
        embedding, samples = embedding_spec(self.backbone.model), {}
        for name, folder in self.folders.items():
            # a component (a joint run's shared adapter), or one unloaded that only finishes its accepted requests
            if not self.metas[name]["task"] or not self.routing_target(name) or name in self.leaving:
                continue
            try:
                samples[name] = load_routing(folder, self.metas[name], embedding)
            except RoutingError as err:  # the adapter still serves requests that name it
                warnings.warn(f"adapter {name!r} is left out of content routing: {err}", stacklevel=3)
        return ContentRouter(samples, threshold=self.route_threshold)

    def column_clash(self, request: dict) -> str | None:
        """Why a row of the row API (Router.run, infer: one dict holds the request's keys and the task's columns) cannot be
        read, or None: its adapter's prompt reads a column named like a request's own key (ENGINE_KEYS) that the row
        gives, so the value would be taken as a raw prompt or the adapter to use, not as the column. (The server's
        `input` refuses those keys: protocol.task_input.)"""
        name = request.get("adapter", BASE)
        if name in (BASE, AUTO) or not isinstance(name, str) or name not in self.metas:
            return None
        spec = self.spec(name)
        clash = [k for k in ENGINE_KEYS if k in spec.prompt_fields and k in request] if spec is not None else []
        if not clash:
            return None
        one = clash[0] != "adapter" and len(set(spec.prompt_fields)) == 1
        return (f"adapter {name!r} reads a column named {clash[0]!r} ({spec.prompt!r}), which a request also uses as its own key; "
                + ("give the column's text as 'text' (it fills a one-column prompt)" if one else
                   "rename that column in the task's data and spec, and train again"))

    def prepare(self, request: dict, name: str, max_new_tokens: int | None = None, *, default_new_tokens: int = 32,
                fill_context: bool = False, max_input_tokens: int | None = None, add_special_tokens: bool = True,
                truncate_prompt_tokens: int | None = None) -> Prepared:
        """What serving one request through adapter `name` (already routed and held) needs: its prompt and ids.

        The request is raw or task-aware. A raw `prompt` (text) or `prompt_ids` (token ids) is used as
        given and continued through the adapter's weights, whatever its task. Otherwise a task adapter
        renders its own template from the request's columns (`text` fills a one-column prompt) and
        answers its task: a classification adapter scores its labels, a generation adapter decodes
        within its task's max_new_tokens unless `max_new_tokens` says otherwise; without a task,
        `text` is the prompt. A raw prompt gets `max_new_tokens`, else `default_new_tokens`
        (`fill_context`: fewer when the context holds fewer).

        The prompt is never shortened unless the caller asks (`truncate_prompt_tokens`: keep its last
        k tokens). Prompt, the adapter's virtual tokens and the new tokens must fit the model's
        context (`max_model_len`), and the prompt `max_input_tokens` (a server's limit); else
        ContextLengthError names every number.
        """
        if name != BASE:
            self._check_known(name)
        spec = self.spec(name) if name != BASE else None
        raw = "prompt" in request or "prompt_ids" in request
        text = raw_text(request) if request.get("adapter") == AUTO and not raw else ""
        if text and not text.strip():
            # no task input, as a named adapter's template would hold none: refused wherever routing sends it (base would
            # answer it; an adapter would refuse a column the request never sent). An empty text is refused below as an empty prompt.
            raise DataError(f"an 'auto' request's text is only whitespace ({text!r}): there is nothing to route by or answer; give it its text")
        tok = self.backbone.tokenizer
        if "prompt_ids" in request:
            ids = list(request["prompt_ids"])
        else:
            prompt = request["prompt"] if raw else render(spec, request_row(spec, request)) if spec else raw_text(request)
            ids = tok(prompt, add_special_tokens=add_special_tokens if raw else True).input_ids  # a task's prompt as training read it
        cut = truncate_prompt_tokens is not None and len(ids) > truncate_prompt_tokens
        if cut:
            ids = keep_end(ids, truncate_prompt_tokens)  # the client asked for it; usage reports what was read
        if not ids:
            raise DataError("the prompt is empty (0 tokens); send at least one token")
        if max_input_tokens is not None and len(ids) > max_input_tokens:
            # the wording clients match to tell an overlong prompt from another 400 (LiteLLM's ContextWindowExceededError)
            raise ContextLengthError(f"the prompt's {len(ids)} input tokens exceed the configured limit of {max_input_tokens} (--max-input-tokens); shorten it")
        virtual = self.virtual_tokens(name)[1]
        room = self.max_model_len - virtual - len(ids)
        if spec is not None and spec.type == "classification" and not raw:
            # scoring runs the prompt and each label but its last token, which is read, never fed (heads.continuation_plan)
            need, what = max(len(t) for t in label_token_ids(tok, spec)) - 1, LABEL_NEED
            budget = 0
        else:
            budget = max_new_tokens if max_new_tokens is not None else spec.train.max_new_tokens if spec and not raw else default_new_tokens
            if fill_context and max_new_tokens is None:
                budget = max(min(budget, room), 1)
            need, what = budget, "for the completion"
        if need > room:
            raise ContextLengthError(over_context(len(ids), virtual, need, what, self.max_model_len, name)
                                     + " (max_model_len, --max-model-len); shorten the prompt or lower max_tokens")
        # the prompt as read: a token-id prompt, or a text one the client's truncation cut, is its kept ids decoded (what `echo`
        # returns, so its log-prob tokens join to it), never the text sent whole
        read = tok.decode(ids, skip_special_tokens=False) if "prompt_ids" in request or cut else prompt
        return Prepared(name, spec, read, ids, budget, raw=raw)

    def label_shape(self, name: str) -> tuple[int, int]:
        """What scoring one request of a classification adapter runs: (tokens of its longest label, which scoring appends
        to the prompt; sequences: 1 when every label is one token, else one per label)."""
        labels = label_token_ids(self.backbone.tokenizer, self.spec(name))
        return max(map(len, labels)), 1 if all(len(t) == 1 for t in labels) else len(labels)

    @_locked
    @torch.inference_mode()
    def classify(self, rows: list[Prepared]) -> list[tuple[int, list[float]]]:
        """Score every label of every classification row in one forward pass: (argmax, probabilities).

        Each row's scoring is heads.label_plan_ids, as in training and evaluation: one sequence per
        request when every label is one token (the next-token distribution scores them all), else one
        sequence per (request, label), summing its tokens' log-probs. The bank runs all the rows'
        sequences together, each through its own adapter. Probabilities are the label scores
        normalized over the labels.
        """
        if not rows:
            return []
        tok = self.backbone.tokenizer
        seqs, adapters, positions, plans = [], [], [], []
        for row in rows:
            labels = label_token_ids(tok, row.spec)
            # prepare() checked that prompt and labels fit the model's context: the plan keeps the whole prompt
            plan = label_plan_ids([row.ids], labels, len(row.ids) + max(map(len, labels)))
            seqs += plan.seqs
            adapters += [row.bank_name] * len(plan.seqs)
            # the plan's picks run sequence by sequence, so each sequence's positions in order rebuild its order
            positions += [[c for r, c in zip(plan.rows, plan.cols) if r == k] for k in range(len(plan.seqs))]
            plans.append(plan)
        logp = torch.cat(self.bank.forward(seqs, adapters, logits_positions=positions)).float().log_softmax(-1)
        # rows of different tasks have different label counts: flatten them for the one host sync of the batch, split back here
        probs = [plan.reduce(part).softmax(-1)[0] for plan, part in zip(plans, logp.split([len(p.rows) for p in plans]))]
        flat, out = torch.cat(probs).tolist(), []
        for p in probs:
            row, flat = flat[: len(p)], flat[len(p) :]
            out.append((max(range(len(row)), key=row.__getitem__), row))
        return out



@dataclass
class Prepared:
    """One request made ready for the bank: its adapter (routed), task, prompt and token ids."""

    adapter: str  # an adapter name or "base"
    spec: TaskSpec | None
    prompt: str  # the text read (token-id prompts, and text ones truncate_prompt_tokens cut: their ids decoded)
    ids: list[int]  # every token read: usage's prompt_tokens
    max_new_tokens: int  # 0 for classification (and for scoring a prompt only)
    raw: bool = False  # a raw prompt, continued as given (else the task's input)

    @property
    def classify(self) -> bool:
        """A classification adapter's task input: scored over its labels, not generated."""
        return self.spec is not None and self.spec.type == "classification" and not self.raw

    @property
    def bank_name(self) -> str | None:
        return None if self.adapter == BASE else self.adapter