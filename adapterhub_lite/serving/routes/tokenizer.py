"""The tokenizer routes (as vLLM's): text to token ids, token ids to text, and the tokenizer's settings.

One tokenizer serves every adapter; a `model` that is given must still name one (a wrong name is a 404).
`messages` for a task adapter are counted as its chat reads them: the last user message in its own template.
A route reads the fields vLLM's request has; a chat template of the client's own is refused as in chat,
any other field is ignored aloud (a log line and the x-adapterhub-ignored-fields header).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from adapterhub_lite.core.names import AUTO, BASE
from adapterhub_lite.serving import protocol as P
from adapterhub_lite.serving.params import H, check_fields, flag, token_ids, unread
from adapterhub_lite.serving.routes.common import read_json, server

router = APIRouter()

TOKENIZE_FIELDS = ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "continue_final_message", "return_token_strs")
CHAT_TEMPLATE_FIELDS = ("chat_template", "chat_template_kwargs", "tools")


async def check_model(body: dict, handlers) -> str | None:
    """A `model` that is given must name one the server serves (else 404). The base's `root` (its weights, as GET
    /v1/models lists it) names the base here too: `vllm bench serve` without --model tokenizes with data[0]'s root,
    which on vLLM is the served model's name, to align its prompts to the server's tokenizer; one tokenizer serves
    every adapter. Returns the model served (None: none named, or the base's root)."""
    if body.get("model") is not None and body["model"] != handlers.catalogue.base_root:
        return await handlers.resolve_model(body)
    return None


@router.post("/tokenize")
async def tokenize(request: Request):
    """A `prompt`'s or a chat's token ids, their count and the model's context."""
    body, handlers = await read_json(request), server(request).handlers
    check_fields({k: body[k] for k in CHAT_TEMPLATE_FIELDS if k in body}, H)  # a template we do not apply: refused, as in chat
    handlers.ignore_aloud(unread(body, TOKENIZE_FIELDS + CHAT_TEMPLATE_FIELDS), "tokenize", request.state.access)
    model = await check_model(body, handlers)
    tok = handlers.tokenizer
    if "messages" in body and body.get("prompt") is not None:  # one of them would go unread
        raise P.bad("prompt", body["prompt"], "give either `prompt` or `messages` to tokenize, not both")
    if "messages" in body and model not in (None, BASE) and handlers.catalogue.has_task(model):
        # a task adapter's chat reads the last user message through its own template, not the chat template: count that
        if model == AUTO:
            raise P.bad("model", model, "'auto' picks the adapter, and so the template a chat is read with, by content; name the adapter")
        messages = P.check_messages(body["messages"])
        handlers.ignore_aloud(P.unread_message_keys(body["messages"]), "tokenize", request.state.access)
        text, special = handlers.task_prompt(model, handlers.task_message(body, model, messages, request.state.access, "tokenize")), True
    elif "messages" in body:
        messages = P.check_messages(body["messages"])
        if not getattr(tok, "chat_template", None):
            raise P.bad("messages", body["messages"], "the backbone's tokenizer has no chat template; tokenize a `prompt` instead")
        handlers.ignore_aloud(P.unread_message_keys(body["messages"]), "tokenize", request.state.access)
        text, unread_names = P.render_chat(tok, messages, add_generation_prompt=flag(body, "add_generation_prompt", True),
                                           continue_final_message=flag(body, "continue_final_message", False))
        handlers.ignore_aloud(unread_names, "tokenize (the chat template does not read them)", request.state.access)
        special = flag(body, "add_special_tokens", False)
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise P.bad("prompt", text, "give the text to tokenize as a string (or `messages`)")
        special = flag(body, "add_special_tokens", True)
    ids = tok(text, add_special_tokens=special).input_ids
    strs = tok.convert_ids_to_tokens(ids) if flag(body, "return_token_strs", False) else None
    # what a request to the named model may fill, as its card in GET /v1/models: a prompt or prefix adapter's virtual tokens
    # take theirs first ('auto', or no model named: the backbone's context)
    virtual = handlers.router.virtual_tokens(model)[1] if model not in (None, AUTO) else 0
    return {"count": len(ids), "max_model_len": handlers.router.max_model_len - virtual, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(request: Request):
    """The text of `tokens`."""
    body, handlers = await read_json(request), server(request).handlers
    handlers.ignore_aloud(unread(body, ("model", "tokens")), "detokenize", request.state.access)
    await check_model(body, handlers)
    return {"prompt": handlers.tokenizer.decode(token_ids(body.get("tokens"), "tokens", handlers.vocab, allow_empty=True))}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    """What a client needs to tokenize as the server does (lm-eval reads eos_token here)."""
    handlers = server(request).handlers
    t = handlers.tokenizer
    return {"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "bos_token": t.bos_token, "pad_token": t.pad_token,
            "unk_token": t.unk_token, "chat_template": getattr(t, "chat_template", None), "model_max_length": handlers.router.max_model_len,
            "vocab_size": len(t)}
