"""A choice's text as the client receives it, built token by token, and the text each token adds.

The returned text is not always the tokens' decoded text: a task's answer is its first line,
stripped; a stop string (and what follows it) is cut; special tokens are skipped. So that a
client can join log-prob tokens back to the text (`"".join(tokens) == text`, OpenAI's contract,
and what lm-eval and others rely on), each token is reported with the piece of the returned text
it added: the leading space an answer's strip removes, an EOS, the newline that ends an answer
add "" and are still listed with their log-probs.

Streaming sends only text that can no longer change (not a partial multi-byte character, not
what may be the start of a stop string, not spaces an answer's final strip removes), and a
token's log-prob goes out in the chunk whose text holds its piece.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import decoders
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from adapterhub_lite.serving.params import SamplingParams


@dataclass
class Entry:
    """One token of a choice (or of an echoed prompt): the text it adds, its id, its log-prob
    (None: the prompt's first token) and the top alternatives [(token id, log-prob)]."""

    text: str
    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


class Detokenizer:
    """`tokenizer.decode(tokens)` of a choice's growing tokens, at every token, without decoding them all again.

    Decoding the whole list at each token costs O(length) per row and step on the engine thread (0.6 ms at 1,000
    tokens with SmolLM2's tokenizer: 38 ms a step at 64 rows). A byte-level BPE (GPT-2's, SmolLM2's, Llama 3's) decodes
    to the UTF-8 of its tokens' bytes joined, so the text is the text up to the last whole character, kept, plus the
    decode of the tokens since, read in a window that starts one token earlier (vLLM's incremental detokenization). That
    is exactly the whole decode (tested against it token by token). Other decoders — SentencePiece's Metaspace drops a
    window's leading space — and transformers' clean_up_tokenization_spaces decode the whole list, as before.

    `context`: the prompt's tokens. Those other decoders drop the space that starts a decoded list, so a completion
    decoded alone lost its first token's leading space (' Paris' read as 'Paris': prompt + text was no longer the prompt
    continued). As vLLM's detokenizer, they decode the completion after the prompt's last tokens and keep what it adds
    to them; a byte-level decode is a concatenation and needs no context."""

    def __init__(self, tokenizer, skip_special_tokens: bool, context: list[int] = ()):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.windowed = (isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)
                         and not getattr(tokenizer, "clean_up_tokenization_spaces", False))
        # Two decodes per row and token run on the engine thread. transformers' decode wraps the Rust decode in ~9 µs of
        # Python (to_py_obj, kwargs, the clean-up check): 1.2 ms a step at 64 rows. Without clean-up its result is the
        # backend's own, so a plain fast tokenizer (neither method overridden, on its class or the instance) is read there.
        plain = (isinstance(tokenizer, PreTrainedTokenizerFast) and type(tokenizer).decode is PreTrainedTokenizerBase.decode
                 and type(tokenizer)._decode is PreTrainedTokenizerFast._decode and not {"decode", "_decode"} & vars(tokenizer).keys())
        self._decode = backend.decode if self.windowed and plain else tokenizer.decode
        self.ids: list[int] = []
        # not windowed: the prompt's last tokens (vLLM reads up to 5), decoded before the completion; dropped when their text
        # does not start the longer decode (a character split at the prompt's end)
        self.context = [] if self.windowed else list(context)[-5:]
        self.prefix = tokenizer.decode(self.context, skip_special_tokens=self.skip) if self.context else ""
        self.kept = ""  # the text of ids[:read], which ends on a whole character
        self.start = self.read = 0  # the window: ids[start:read] is its context, ids[read:] the tokens since
        self.text = ""

    def push(self, tok: int) -> str:
        """Add a token; return the decoded text of every token so far."""
        self.ids.append(tok)
        if not self.windowed:
            whole = self.tokenizer.decode(self.context + self.ids, skip_special_tokens=self.skip)
            if self.context and not whole.startswith(self.prefix):
                self.context, self.prefix = [], ""
                whole = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
            self.text = whole[len(self.prefix) :]
            return self.text
        context = self._decode(self.ids[self.start : self.read], skip_special_tokens=self.skip)
        window = self._decode(self.ids[self.start :], skip_special_tokens=self.skip)
        if not window.startswith(context):  # not a concatenation after all: decode the whole list from now on
            self.windowed = False
            return self.push(self.ids.pop())
        if window.endswith("\ufffd"):  # a character's bytes are still coming: nothing past `read` is final yet
            self.text = self.kept + window[len(context) :]
        else:
            self.kept = self.text = self.kept + window[len(context) :]
            self.start, self.read = self.read, len(self.ids)
        return self.text


class TextState:
    """One choice's tokens, its text as returned, why it ends, and what was streamed of it."""

    def __init__(self, tokenizer, params: SamplingParams, *, answer_mode: bool, max_new_tokens: int, prompt_ids: list[int] = ()):
        self.params, self.answer_mode, self.max_new_tokens = params, answer_mode, max_new_tokens
        self.eos = tokenizer.eos_token_id
        self.tokens: list[int] = []
        self.infos: list = []  # per token: (logprob, top) or None
        self.reach: list[int] = []  # per token: how far into the text it or any token before it reaches
        self.decoded = Detokenizer(tokenizer, params.skip_special_tokens, context=prompt_ids)  # the text continues the prompt's
        self.text = ""
        self.reason: str | None = None
        self.stop_reason: str | int | None = None  # vLLM's field: the stop string or stop token id that ended it (EOS: None)
        self.sent = 0  # characters of `text` streamed
        self.released = 0  # tokens whose entries were streamed
        self._search_from = 0  # stop strings are looked for only from here (min_tokens)
        self._searched = 0  # the text before this was searched at an earlier token (a byte-level decode only appends)
        self._hold = max((len(s) - 1 for s in params.stop), default=0)  # characters a stop string may still claim (read every step)

    def add(self, tok: int, info=None) -> str | None:
        """Record the next token; return why the choice ends ("stop" or "length") or None."""
        p = self.params
        self.tokens.append(tok)
        self.infos.append(info)
        n = len(self.tokens)
        checking = n >= p.min_tokens  # before min_tokens only the length ends a choice (vLLM's rule)
        # vLLM's detokenizer looks for stop strings only once more than min_tokens tokens are out, in the text after them
        # (less a stop string's length): one found within the first min_tokens tokens does not end the choice
        strings = n > p.min_tokens
        at_eos = checking and tok == self.eos and not p.ignore_eos
        token_stop = at_eos or (checking and tok in p.stop_token_ids)
        # The token that stops the choice (EOS, a stop_token_id) is kept among the tokens but not rendered, unless
        # include_stop_str_in_output: vLLM's detokenizer leaves it out of the text the same way.
        # (the choice ends at that token, so it is simply never decoded)
        text = self.decoded.text if token_stop and not p.include_stop_str_in_output else self.decoded.push(tok)
        reason = "stop" if token_stop else None
        # vLLM's check_stop tests EOS before stop_token_ids: EOS listed among them still ends the choice as EOS (stop_reason
        # None), unless ignore_eos, when only the list can end it there
        self.stop_reason = tok if token_stop and not at_eos and tok in p.stop_token_ids else None
        if self.answer_mode:  # the task's answer is its first non-empty line, stripped (Router.answer)
            text = text.lstrip()
            if "\n" in text:
                text, reason = text.split("\n", 1)[0], "stop"
        # Stop strings are looked for in the text up to its last whole character: a partial character's U+FFFD is a
        # placeholder for bytes still coming (vLLM's detokenizer has not emitted them yet), so a stop '\ufffd' must not
        # end the choice on the first byte of an 'é', and the text min_tokens' tokens ended at leaves out a character
        # they only began (the token that completes it adds it, and a stop string in it counts)
        settled = len(text.rstrip("\ufffd"))
        if strings and p.stop:
            # Only the text this token may have completed is read, as vLLM's stop checker reads the new characters less a
            # stop string's length: up to `settled` a byte-level decode never changes, so a stop string wholly before the
            # last search's end was found then. Reading the whole text every token cost O(length × stops) a row and step
            # on the engine thread (29 µs at 8,000 characters and 4 stops, 516 µs at 64). A decode that rewrites earlier
            # text (transformers' clean-up of spaces, SentencePiece) is searched whole, from the min_tokens point.
            start = max(self._search_from, self._searched if self.decoded.windowed else 0)
            # the first listed that this token completed, as vLLM's check_stop_strings reads the list: one token may
            # complete two ('日' and 'b日' at the character it ends), and the client's order decides which ends the text
            found = next(((at, s) for s in p.stop if (at := text.find(s, max(0, start - len(s) + 1), settled)) >= 0), None)
            if found:
                at, s = found
                text, reason = text[: at + (len(s) if p.include_stop_str_in_output else 0)], "stop"
                self.stop_reason = s
            self._searched = settled
        elif not strings:
            self._search_from = settled
        if reason is None and n >= self.max_new_tokens:
            reason = "length"
        end = len(text) if reason else settled  # a partial character is not there yet (text is unchanged since `settled`)
        self.reach.append(max(end, self.reach[-1] if self.reach else 0))
        self.text = text.strip() if reason and self.answer_mode else text
        self.reason = reason
        return reason

    def _safe(self) -> int:
        """Characters of the text that can no longer change."""
        if self.reason:
            return len(self.text)
        hold = self._hold
        # a partial character first, then the hold: the hold counts whole characters back from the last one, since a stop
        # string may end in the character whose bytes are still coming ('U˃' after 'U' and half of '˃'); a text shorter than
        # the hold has nothing safe (a negative end would slice from the back and send what the stop string may still cut)
        whole = self.text.rstrip("\ufffd")
        safe = whole[: max(0, len(whole) - hold)]
        return len(safe.rstrip() if self.answer_mode else safe)

    def _bound(self, k: int, limit: int) -> int:
        """Where the piece of token k ends: the furthest any token up to k reached, within `limit`."""
        return min(self.reach[k], limit)

    def take(self) -> tuple[str, list[Entry]]:
        """The text and token entries not streamed yet that can no longer change (all of them once the choice ended)."""
        safe = self._safe()
        delta = self.text[self.sent : max(self.sent, safe)]
        self.sent = max(self.sent, safe)
        # runs for every row at every step: the bounds (_bound) are inlined and the loop reads locals
        entries, text, reach, k, done = [], self.text, self.reach, self.released, self.reason is not None
        limit, n = len(text), len(self.tokens)
        while k < n and (done or reach[k] <= safe):
            start = min(reach[k - 1], limit) if k else 0
            entries.append(self._entry(k, text[start : max(start, min(reach[k], limit))]))
            k += 1
        self.released = k
        return delta, entries

    def entries(self) -> list[Entry]:
        """Every token's entry (the choice has ended)."""
        limit = len(self.text)
        out, start = [], 0
        for k in range(len(self.tokens)):
            end = max(start, self._bound(k, limit))
            out.append(self._entry(k, self.text[start:end]))
            start = end
        return out

    def _entry(self, k: int, piece: str) -> Entry:
        info = self.infos[k]
        return Entry(piece, self.tokens[k], None if info is None else info[0], None if info is None else info[1])


def prompt_pieces(tokenizer, ids: list[int], text: str | None = None) -> list[str]:
    """The text each prompt token adds to the decoded prompt (special tokens kept: they are part of it), or to `text`, the
    prompt as echoed: a special token the tokenizer added that `text` does not hold (a BOS) adds "" to it."""
    pieces = _pieces(tokenizer, ids)
    if text is None or "".join(pieces) == text:
        return pieces
    special, lead = set(tokenizer.all_special_ids), 0
    while lead < len(ids) and ids[lead] in special:
        lead += 1
    # the special tokens the tokenizer put first that the text does not hold: the rest is decoded without them, since a
    # SentencePiece decoder also puts a space between '<s>' and the first word ('<s> The'), which is no token's text
    for j in range(lead, 0, -1):
        rest = _pieces(tokenizer, ids[j:]) if j < len(ids) else []
        if "".join(rest) == text:
            return [""] * j + rest
    spans = _text_spans(tokenizer, ids, text)
    return pieces if spans is None else spans  # None: `ids` are not `text`'s encoding; the pieces stay as decoded


def _text_spans(tokenizer, ids: list[int], text: str) -> list[str] | None:
    """The pieces of `text` its own encoding's offsets give each token, when `ids` are that encoding (None otherwise).

    Decoding drops what some tokenizers cannot give back: a SentencePiece backbone reads ' Hello' and 'Hello' alike
    ('▁Hello'), so no decoded piece holds the space the text starts with, and text_offset ran one character off the
    echoed text for every token. The offsets place each token in the text as sent. A character split over several
    tokens (a multi-byte one) belongs to the token that completes it, as in the decoded pieces."""
    try:  # with and without the special tokens the tokenizer adds: the prompt was read one of the two ways
        encs = [tokenizer(text, add_special_tokens=added, return_offsets_mapping=True) for added in (True, False)]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
        return None
    enc = next((e for e in encs if list(e["input_ids"]) == list(ids)), None)
    if enc is None:
        return None
    spans, start = enc["offset_mapping"], 0
    out = []
    for k, (_, end) in enumerate(spans):
        last = k == len(spans) - 1
        if last or spans[k + 1][0] >= end:  # the next token starts past this one's end: this one completes its span
            stop = len(text) if last else max(end, start)
            out.append(text[start:stop])
            start = stop
        else:
            out.append("")
    return out if "".join(out) == text else None


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    pieces = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False)
    whole = tokenizer.decode(ids, skip_special_tokens=False)
    if "".join(pieces) == whole:  # byte-level BPE: each token decodes alone to its own text
        return pieces
    out, prev = [], ""  # tokenizers whose tokens decode differently alone (SentencePiece's leading space, split bytes)
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        text = text if k == len(ids) else text.rstrip("\ufffd")
        out.append(text[len(prev):] if text.startswith(prev) else "")
        prev = text if text.startswith(prev) else prev
    return out
