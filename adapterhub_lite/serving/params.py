"""Every request field the server knows, and a request's generation settings (SamplingParams).

One table (FIELDS) says, for each field of OpenAI's completions and chat references, of vLLM's
extras and of our own, whether the server implements it, accepts it without any effect on the
answer (e.g. `user`), or refuses it. A refused field set to anything but its neutral value gets a
400 naming it; the README's field table is this table (a test holds them equal). A field in no
table is ignored as vLLM ignores it, but never silently: the server logs it and names it in the
`x-adapterhub-ignored-fields` response header.

Numbers are checked as JSON gives them (a 400-digit integer is compared, never cast to float).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field, replace
from urllib.parse import quote

from adapterhub_lite.core.numbers import is_count
from adapterhub_lite.serving.protocol import ApiError, bad

C, H = "completions", "chat"
BOTH = (C, H)
IGNORED_HEADER = "x-adapterhub-ignored-fields"
ROUTING_HEADER = "x-adapterhub-routing"  # how `auto` chose each choice's adapter (answers.Answers.note_routing)
# What a field name may keep as it is in the ignored-fields header and the log line: visible ASCII but the header's
# separator (',') and the escape ('%'). A client chooses these names: CR/LF in one made h11 refuse the whole response
# (the client got no answer at all) and split the log line; non-ASCII went out as raw bytes HTTP does not promise.
_NAME_SAFE = "".join(c for c in string.printable if c not in string.whitespace and c not in ",%")


def shown_name(name: str) -> str:
    """A request field's name as the ignored-fields header and the server log show it: percent-encoded (UTF-8, as in
    a URL) where it has a character outside visible ASCII, ',' or '%'; an ordinary name (`tool_prompt`,
    `stream_options.continuous_usage_stats`, `messages[0]`) is unchanged."""
    return quote(name, safe=_NAME_SAFE)
# Below this temperature a draw is greedy (vLLM's rule): dividing logits by 1e-45 overflows to inf.
GREEDY_BELOW = 1e-5
MAX_N = 16  # choices per request (n); each is a row of the batch
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit)
MAX_STOP = 64  # stop strings per request: OpenAI takes 4, vLLM any number (lm-eval's `until` lists can be longer than 4)


@dataclass(frozen=True)
class Field:
    """One request field: where it applies, what the server does with it, and (refused fields) the values that change nothing."""

    endpoints: tuple[str, ...]
    status: str  # "implemented" | "accepted" (read, no effect on the answer) | "refused"
    note: str
    neutral: tuple = (None,)  # refused / partly refused fields: values that are accepted (they change nothing)


def _refused(note: str, *neutral, endpoints=BOTH) -> Field:
    return Field(endpoints, "refused", note, (None, *neutral))


# The order is the README table's: OpenAI's fields, vLLM's extras, ours.
FIELDS: dict[str, Field] = {
    # -- OpenAI (completions and chat references) ------------------------------------------------
    "model": Field(BOTH, "implemented", "an adapter, `name@version`, `base` or `auto`"),
    "prompt": Field((C,), "implemented", "a string, a list of strings, a token-id list or a list of token-id lists; used as given"),
    "messages": Field((H,), "implemented", "a task adapter reads the last user message (the others are named in `x-adapterhub-ignored-fields`); `base` applies the chat template"),
    "max_tokens": Field(BOTH, "implemented", "must fit the model's context with the prompt (else 400); 0 allowed with `echo` or `prompt_logprobs`"),
    "max_completion_tokens": Field((H,), "implemented", "as `max_tokens`"),
    "temperature": Field(BOTH, "implemented", f"0 (or below {GREEDY_BELOW}) is greedy"),
    "top_p": Field(BOTH, "implemented", "nucleus filter before a draw"),
    "n": Field(BOTH, "implemented", f"up to {MAX_N} choices, each a row of the batch; with `seed`, choice i draws with seed + i"),
    "best_of": Field((C,), "refused", "accepted only equal to `n` (no ranking of extra samples)"),
    "stream": Field(BOTH, "implemented", "server-sent events, one chunk per step; every choice streams"),
    "stream_options": Field(BOTH, "implemented", "`include_usage`; with it `continuous_usage_stats` (vLLM's): every chunk carries its choice's usage so far; `include_obfuscation` false only (no padding)"),
    "stop": Field(BOTH, "implemented", "up to 64 strings (OpenAI takes 4, vLLM any number); the text ends before the first one generated (of those one token completes, the first listed, as vLLM reads them; see `include_stop_str_in_output`)"),
    "logprobs": Field(BOTH, "implemented", "completions: top k (0-20) plus the chosen token; chat: true/false with `top_logprobs`; the model's own log-probs"),
    "top_logprobs": Field((H,), "implemented", "0-20 alternatives per token"),
    "echo": Field((C,), "implemented", "the prompt comes back before the completion, with its token log-probs (first null)"),
    "frequency_penalty": Field(BOTH, "implemented", "logit - f * count of the token in the completion so far"),
    "presence_penalty": Field(BOTH, "implemented", "logit - p if the token is in the completion so far"),
    "logit_bias": Field(BOTH, "implemented", "{token id: bias in [-100, 100]} added to the logits"),
    "seed": Field(BOTH, "implemented", "a sampled request repeats exactly with the same seed"),
    "user": Field(BOTH, "accepted", "written to the access log"),
    "suffix": _refused("no insertion (fill-in-the-middle)", "", endpoints=(C,)),
    "response_format": _refused("no structured output; `{\"type\": \"text\"}` is accepted", {"type": "text"}),
    "tools": _refused("no tool calls", [], endpoints=(H,)),
    "tool_choice": _refused("no tool calls; `\"none\"` is accepted", "none", endpoints=(H,)),
    "parallel_tool_calls": Field((H,), "accepted", "no tools, so no effect"),
    "functions": _refused("no function calls (deprecated by OpenAI)", [], endpoints=(H,)),
    "function_call": _refused("no function calls (deprecated by OpenAI); `\"none\"` is accepted", "none", endpoints=(H,)),
    "audio": _refused("text only", endpoints=(H,)),
    "modalities": _refused("text only; `[\"text\"]` is accepted", ["text"], endpoints=(H,)),
    "prediction": _refused("no predicted outputs", endpoints=(H,)),
    "reasoning_effort": _refused("not a reasoning model; `\"none\"` (no reasoning) is accepted", "none", endpoints=(H,)),
    "verbosity": _refused("no verbosity control", endpoints=(H,)),
    "web_search_options": _refused("no web search", endpoints=(H,)),
    "store": _refused("nothing is stored; `false` is accepted", False, endpoints=(H,)),
    "metadata": Field((H,), "accepted", "kept with nothing (only meaningful with `store`)"),
    "service_tier": Field((H,), "accepted", "one tier"),
    "prompt_cache_key": Field((H,), "accepted", "no prompt cache"),
    "prompt_cache_options": Field((H,), "accepted", "no prompt cache"),
    "prompt_cache_retention": Field((H,), "accepted", "no prompt cache"),
    "moderation": _refused("no moderation: nothing is scored or blocked", endpoints=(H,)),
    "safety_identifier": Field((H,), "accepted", "written to the access log"),
    # -- vLLM's extras ---------------------------------------------------------------------------
    "top_k": Field(BOTH, "implemented", "keep the k most likely tokens before a draw (0 or -1: off)"),
    "min_p": Field(BOTH, "implemented", "drop tokens below min_p × the top token's probability before a draw"),
    "repetition_penalty": Field(BOTH, "implemented", "tokens of the prompt or completion: positive logits ÷ p, negative × p"),
    "stop_token_ids": Field(BOTH, "implemented", "generating one of these ends the choice (finish_reason stop); its text is left out, as EOS's is; the backbone's generation config's other EOS ids join them unless `ignore_eos` (vLLM's rule)"),
    "include_stop_str_in_output": Field(BOTH, "implemented", "keep the matched stop string, or the text of the token that stopped the choice, in the text"),
    "ignore_eos": Field(BOTH, "implemented", "EOS does not end the choice: it runs to `max_tokens` (refused for a task's `input` or chat answer: its first line)"),
    "min_tokens": Field(BOTH, "implemented", "EOS and `stop_token_ids` are masked before this many tokens, and stop strings are looked for only in the text after them (vLLM's rule; refused for a task's answer, and above the default `max_tokens` when that is unset: 16, or what the context leaves a chat)"),
    "skip_special_tokens": Field(BOTH, "implemented", "false keeps special tokens in the text (an EOS or stop token that ends the choice is still left out unless `include_stop_str_in_output`, as vLLM)"),
    "spaces_between_special_tokens": _refused("decoding is the tokenizer's own; `true` is accepted", True),
    "truncate_prompt_tokens": Field(BOTH, "implemented", "keep the prompt's last k tokens, because the client asked; usage counts, and `echo` returns, what was read"),
    "truncation_side": _refused("`truncate_prompt_tokens` keeps the prompt's last tokens; `\"left\"` (that) is accepted, `\"right\"` is not built", "left"),
    "allowed_token_ids": Field(BOTH, "implemented", "every other token is masked; refused when each is a stop token (`stop_token_ids`, EOS) that `min_tokens` masks"),
    "prompt_logprobs": Field(BOTH, "implemented", "per prompt token: its log-prob and rank plus the top k, vLLM's shape; a completions stream carries them in its first chunk, a chat stream refuses them (as vLLM refuses them in any stream)"),
    "add_special_tokens": Field(BOTH, "implemented", "tokenize a text prompt with the tokenizer's special tokens (completions default true, chat false); a task's input is read with them (false refused)"),
    "add_generation_prompt": Field((H,), "implemented", "`base` chat: end the template with the assistant's turn (default true)"),
    "continue_final_message": Field((H,), "implemented", "`base` chat: continue the last (assistant) message"),
    "return_token_ids": Field(BOTH, "implemented", "each choice also carries `prompt_token_ids` and `token_ids`; streamed (vLLM's shape), each chunk carries its tokens' `token_ids` and a choice's first chunk the `prompt_token_ids` (chat: on the first chunk, beside `choices`)"),
    "request_id": Field(BOTH, "implemented", "the response's `id` and the access log's; an `X-Request-Id` header is read first (vLLM's order)"),
    "priority": _refused("no priority scheduling; `0` is accepted", 0),
    "cache_salt": Field(BOTH, "accepted", "no prefix cache"),
    "use_beam_search": _refused("no beam search", False),
    "length_penalty": _refused("beam search only; `1` is accepted", 1, 1.0),
    "bad_words": _refused("not built; use `logit_bias` with -100", []),
    "guided_json": _refused("no guided decoding"),
    "guided_regex": _refused("no guided decoding"),
    "guided_choice": _refused("no guided decoding"),
    "guided_grammar": _refused("no guided decoding"),
    "guided_decoding_backend": _refused("no guided decoding"),
    "guided_whitespace_pattern": _refused("no guided decoding"),
    "structured_outputs": _refused("no guided decoding"),
    "logits_processors": _refused("no server-side code from requests", []),
    "return_tokens_as_token_ids": Field(BOTH, "implemented", "log-prob tokens (and their top alternatives' keys) are `\"token_id:<id>\"`; text_offset still counts the text"),
    "kv_transfer_params": _refused("no disaggregated prefill"),
    "vllm_xargs": _refused("no extension arguments", {}),
    "prompt_embeds": _refused("prompts are text or token ids", endpoints=(C,)),
    "mm_processor_kwargs": _refused("text only", {}),
    "documents": _refused("no retrieval templates", [], endpoints=(H,)),
    "chat_template": _refused("the backbone's own template is used", endpoints=(H,)),
    "chat_template_kwargs": _refused("the backbone's own template is used", {}, endpoints=(H,)),
    "chat_echo": _refused("(vLLM's chat `echo`) not built; use /v1/completions with `echo`", False, endpoints=(H,)),
    # -- ours ------------------------------------------------------------------------------------
    "input": Field((C,), "implemented", "the task's columns (or one string): the adapter's own template, the task's answer"),
    "merged_adapters": Field(BOTH, "implemented", "a per-request merge (LoRAX's), built once and cached"),
}
# vLLM's chat `echo` shares its name with the completions field; the table keeps it apart.
_ALIASES = {(H, "echo"): "chat_echo"}


def _entry(endpoint: str, name: str) -> Field | None:
    f = FIELDS.get(_ALIASES.get((endpoint, name), name))
    return f if f is not None and endpoint in f.endpoints else None


def _same(a, b) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def check_fields(body: dict, endpoint: str) -> list[str]:
    """Refuse (400) a refused field set to a non-neutral value; return the fields this endpoint does not know."""
    unknown = []
    for name, value in body.items():
        f = _entry(endpoint, name)
        if f is None:
            unknown.append(name)
        elif f.status == "refused" and name != "best_of" and not any(_same(value, v) for v in f.neutral):
            raise bad(name, value, f"this server does not implement it ({f.note}); drop it from the request", code="unsupported_field")
    return unknown


def unread(body: dict, known) -> list[str]:
    """The fields of `body` a route does not read (those not in `known`), for it to name (Handlers.ignore_aloud)."""
    return [k for k in body if k not in known]


# -- numbers and lists as JSON gives them ------------------------------------------------------------

def number(body: dict, name: str, default, low: float, high: float, kind=float):
    """body[name] checked to be a number in [low, high] (an integer for kind=int); `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, value, f"give {what} between {low} and {high}")
    if isinstance(value, float) and (not math.isfinite(value) or (kind is int and not value.is_integer())):
        raise bad(name, value, f"give {what} between {low} and {high}")
    if not low <= value <= high:  # exact for any int: no cast of a 400-digit integer to float
        raise bad(name, value, f"give a value between {low} and {high}")
    return kind(value)


def flag(body: dict, name: str, default: bool) -> bool:
    """body[name] checked to be true or false; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, value, "give true or false")
    return value


def token_ids(value, name: str, vocab: int, allow_empty: bool = False) -> list[int]:
    """A list of token ids, each in [0, vocab)."""
    if not isinstance(value, list) or (not value and not allow_empty) or not all(is_count(t) for t in value):
        raise bad(name, value, "give a list of token ids (integers)")
    out = [t for t in value if not 0 <= t < vocab]
    if out:
        raise bad(name, value, f"token id {out[0]} is outside this model's vocabulary [0, {vocab})")
    return list(value)


def stop_strings(body: dict) -> tuple[str, ...]:
    """`stop` as a tuple of up to MAX_STOP non-empty strings."""
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", stop, f"give a non-empty string or a list of up to {MAX_STOP} non-empty strings")
    return tuple(stops)


def logit_bias(body: dict, vocab: int) -> dict[int, float]:
    """`logit_bias` as {token id: bias}, each id in the vocabulary and each bias in [-100, 100] (OpenAI's limits)."""
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > 300:
        raise bad("logit_bias", raw, "give an object of up to 300 {\"token id\": bias} pairs")
    out = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < vocab):  # str.isdigit takes '²' (int() fails) and '٣'
            raise bad("logit_bias", raw, f"key {key!r} is not a token id of this model (0 to {vocab - 1})")
        out[int(key)] = number({"logit_bias": value}, "logit_bias", 0.0, -100.0, 100.0)
    return out


# -- a request's generation settings ---------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """How one choice is generated and reported (the engine's per-row settings)."""

    max_tokens: int | None = None  # None: the default (a task's budget, 16 for a raw prompt, or what the context leaves in base chat)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's log-prob and the top k
    echo: bool = False
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature/top-p/top-k/min-p changes the logits before the choice."""
        return bool(self.logit_bias or self.allowed_token_ids is not None or self.min_tokens or self.repetition_penalty != 1.0
                    or self.presence_penalty or self.frequency_penalty)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None or self.prompt_logprobs is not None

    def stop_ids(self, eos_id: int | None) -> list[int]:
        """The token ids that end a choice, which min_tokens masks: `stop_token_ids`, and EOS unless `ignore_eos`."""
        return list(self.stop_token_ids) + ([] if self.ignore_eos or eos_id is None else [eos_id])

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)


def sampling_params(body: dict, endpoint: str, *, vocab: int, max_tokens_limit: int) -> SamplingParams:
    """The generation settings a completions or chat body asks for, each checked (400 naming the field)."""
    max_tokens = number(body, "max_tokens", None, 0, max_tokens_limit, int)
    if endpoint == H:  # OpenAI's current name wins over the deprecated max_tokens, as vLLM reads them
        max_tokens = number(body, "max_completion_tokens", max_tokens, 0, max_tokens_limit, int)
    logprobs = body.get("logprobs")
    if endpoint == H:  # chat: logprobs=true, top_logprobs=k
        if logprobs is not None and not isinstance(logprobs, bool):
            raise bad("logprobs", logprobs, "in chat, give true or false (and top_logprobs: k)")
        top = number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, int)
        if body.get("top_logprobs") is not None and not logprobs:
            raise bad("top_logprobs", body["top_logprobs"], "set logprobs: true with it")
        logprobs = top if logprobs else None
    else:
        logprobs = number(body, "logprobs", None, 0, MAX_LOGPROBS, int)
    echo = flag(body, "echo", False) if endpoint == C else False
    prompt_lp = number(body, "prompt_logprobs", None, 0, MAX_LOGPROBS, int)
    if max_tokens == 0 and not (echo or prompt_lp is not None):  # named as sent: chat's max_completion_tokens is read first
        sent = "max_completion_tokens" if endpoint == H and body.get("max_completion_tokens") is not None else "max_tokens"
        raise bad(sent, 0, "0 new tokens only make sense with echo or prompt_logprobs; give at least 1")
    top_k = number(body, "top_k", 0, -1, 1 << 31, int)
    allowed = body.get("allowed_token_ids")
    n = number(body, "n", 1, 1, MAX_N, int)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of", best_of, f"this server does not rank extra samples; drop it or make it equal to n ({n})", code="unsupported_field")
    # The answer's shape is read when the answer is written, after generation (and a stream's 200 is sent by then):
    # the flags are checked here, with the rest, so a bad value is a 400 before any work rather than a cut stream.
    stream = flag(body, "stream", False)
    for name in ("return_token_ids", "return_tokens_as_token_ids"):
        flag(body, name, False)
    opts = body.get("stream_options")
    if opts is not None and not stream:
        raise bad("stream_options", opts, "it applies to a stream only: set stream: true, or drop it")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats", "include_obfuscation"}:
            raise bad("stream_options", opts, "give {\"include_usage\": true|false} (with it vLLM's \"continuous_usage_stats\")")
        for key in ("include_usage", "continuous_usage_stats", "include_obfuscation"):
            if opts.get(key) is not None and not isinstance(opts[key], bool):
                raise bad(f"stream_options.{key}", opts[key], "give true or false")
        if opts.get("include_obfuscation"):  # the openai client's own stream option: false (what is done) is accepted
            raise bad("stream_options.include_obfuscation", True, "chunks carry no `obfuscation` padding here; send false or drop it",
                      code="unsupported_field")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=max(top_k, 0),
        min_p=number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=logit_bias(body, vocab),
        allowed_token_ids=None if allowed is None else tuple(token_ids(allowed, "allowed_token_ids", vocab)),
        ignore_eos=flag(body, "ignore_eos", False),
        min_tokens=number(body, "min_tokens", 0, 0, max_tokens_limit, int),
        stop=stop_strings(body),
        stop_token_ids=tuple(token_ids(body.get("stop_token_ids") or [], "stop_token_ids", vocab, allow_empty=True)),
        include_stop_str_in_output=flag(body, "include_stop_str_in_output", False),
        skip_special_tokens=flag(body, "skip_special_tokens", True),
        # any signed 64-bit seed, as vLLM takes (and OpenAI: clients send -1); choice i draws with seed + i, which torch's
        # generator takes up to 2**64 - 1, so no choice overflows
        seed=number(body, "seed", None, -(2**63), 2**63 - 1, int),
        logprobs=logprobs,
        echo=echo,
        prompt_logprobs=prompt_lp,
    )
    if params.top_p == 0.0:
        raise bad("top_p", 0, "give a value in (0, 1]; use temperature 0 for greedy decoding")
    if max_tokens is not None and params.min_tokens > max_tokens:
        raise bad("min_tokens", params.min_tokens, f"give at most max_tokens ({max_tokens})")
    check_a_token_is_left(params, None)  # EOS is checked when the request is read (the engine knows the tokenizer)
    return params


def check_a_token_is_left(params: SamplingParams, eos_id: int | None) -> None:
    """Refuse (400) `allowed_token_ids` that are all stop tokens (`stop_token_ids`, or EOS unless `ignore_eos`) while
    `min_tokens` masks those: no token would be left to generate. The sampler would otherwise pick a token outside
    the allowed set (greedy: the argmax of an all -inf row) or fail the whole batch's step (a draw from NaN)."""
    if params.allowed_token_ids is None or not params.min_tokens:
        return
    if set(params.allowed_token_ids) <= set(params.stop_ids(eos_id)):
        raise bad("allowed_token_ids", list(params.allowed_token_ids),
                  f"each one ends the choice (stop_token_ids{'' if params.ignore_eos else ' or EOS'}) and is masked until min_tokens "
                  f"({params.min_tokens}) tokens were generated, so no token is left; allow another token or drop min_tokens")


def check_min_tokens_fit(params: SamplingParams, budget: int) -> None:
    """Refuse (400) `min_tokens` above the new tokens the request may generate when `max_tokens` was left out (then
    sampling_params could not compare them): a completion's default 16, or what the context leaves a base chat. The
    choice would end at that budget with finish_reason "length", shorter than the client asked; vLLM refuses it too."""
    if params.min_tokens > budget:
        raise bad("min_tokens", params.min_tokens, f"this request may generate at most {budget} new tokens (max_tokens unset: a "
                  "completion's default of 16, or what the context leaves a chat); set max_tokens to at least min_tokens or lower min_tokens")


def with_model_eos(params: SamplingParams, model_eos) -> SamplingParams:
    """`params` with the backbone's other end-of-sequence ids (its generation config's `eos_token_id` besides the
    tokenizer's EOS, e.g. Llama 3's <|eom_id|>, Qwen's <|endoftext|>) among its stop_token_ids, unless `ignore_eos`: vLLM's
    rule (update_from_generation_config), and where transformers' generate stops. Otherwise a choice ran past them."""
    extra = [t for t in model_eos if t not in params.stop_token_ids]
    return params if params.ignore_eos or not extra else replace(params, stop_token_ids=(*params.stop_token_ids, *extra))


# What a label answer cannot honour: each field with its neutral value (the value that asks for nothing).
_NOT_FOR_LABELS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "logit_bias": {}, "allowed_token_ids": None, "ignore_eos": False, "min_tokens": 0,
                   "stop": (), "stop_token_ids": (), "logprobs": None, "prompt_logprobs": None}


def check_label_answer(adapter: str, params: SamplingParams) -> None:
    """Refuse, naming every one, the settings a classification adapter's answer cannot honour.

    Its task input is answered by scoring its labels (the most probable one, exactly as `eval`), so no token
    is sampled or generated: temperature, the filters, penalties, EOS and stop settings and token log-probs
    would change nothing, and a client relying on them (a load tester fixing output lengths with ignore_eos)
    would read wrong figures. `max_tokens`, `n` and `seed` are accepted: they ask for nothing a label breaks.
    """
    set_ = {name: getattr(params, name) for name, neutral in _NOT_FOR_LABELS.items()
            if (not params.greedy if name == "temperature" else getattr(params, name) != neutral)}
    if set_:
        shown = ", ".join(f"`{k}` {v!r}" for k, v in set_.items())
        raise ApiError(400, f"adapter {adapter!r} answers its task input by scoring its labels (the most probable one), so it samples and "
                       f"generates no token: {shown} cannot apply; drop {'them' if len(set_) > 1 else 'it'}, ask /v1/classify for every "
                       "label's probability, or send the rendered prompt as `prompt` to generate from the language model",
                       code="invalid_value", param=next(iter(set_)))
