"""A streamed choice says only what the whole answer says: its concatenated deltas equal the text of the same choice
answered whole, token by token through serving/output.py's TextState (no server: the tiny byte-level tokenizer, where a
character of two bytes is two tokens)."""

from adapterhub_lite.model.weights import _tiny_tokenizer
from adapterhub_lite.serving.output import TextState
from adapterhub_lite.serving.params import SamplingParams


def streamed(tok, text: str, **params) -> tuple[str, str, str]:
    """Feed `text`'s tokens one at a time, taking what may be streamed after each: (deltas joined, whole text, reason)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    state = TextState(tok, SamplingParams(**params), answer_mode=False, max_new_tokens=len(ids))  # ends at the last token
    out = []
    for t in ids:
        reason = state.add(t)
        out.append(state.take()[0])
        if reason:
            break
    return "".join(out), state.text, state.reason


def test_stop_string_ending_in_a_split_character_holds_back_what_it_may_cut():
    """'U˃' as a stop: after 'U' and the first byte of '˃' the text ends in a partial character; the hold for a stop
    string's start must count from the last whole character, or 'U' goes out before the stop cuts it."""
    tok = _tiny_tokenizer()
    for stop, include in (("U˃", False), ("U˃", True), ("xU˃", False)):
        joined, whole, reason = streamed(tok, "\x1cUF\x1cxU˃\x1c#", stop=(stop,), include_stop_str_in_output=include)
        assert reason == "stop" and whole == "\x1cUF\x1cx"[: None if stop == "U˃" else -1] + (stop if include else "")
        assert joined == whole, (stop, include, joined, whole)


def test_deltas_join_to_the_text_with_split_characters_and_no_stop():
    tok = _tiny_tokenizer()
    joined, whole, _ = streamed(tok, "héllo 世界 🎉 done", stop=("zz",))
    assert joined == whole == "héllo 世界 🎉 done"


def test_stop_strings_are_looked_for_only_after_min_tokens_tokens():
    """vLLM's detokenizer checks stop strings once more than min_tokens tokens are out, from the text those tokens
    ended at (less the stop string's length): with min_tokens k, a stop inside the first k tokens' text does not end
    the choice. Here every token is ':' (one byte, one token)."""
    tok = _tiny_tokenizer()
    for min_tokens, stop, want in ((0, ":", ""), (1, ":", ":"), (2, ":", "::"), (2, "::", ":"), (3, "::", "::")):
        state = TextState(tok, SamplingParams(stop=(stop,), min_tokens=min_tokens), answer_mode=False, max_new_tokens=8)
        while not state.add(tok(":", add_special_tokens=False)["input_ids"][0]):
            pass
        assert (state.text, state.reason, len(state.tokens)) == (want, "stop", min_tokens + 1), (min_tokens, stop)


def test_a_text_shorter_than_a_stop_string_streams_nothing_the_stop_may_cut():
    """Stop 'User:' holds back its length less one (4 characters); after 'Use' the safe end was 3 - 4 = -1, which sliced
    from the back and streamed 'Us' before 'User:' cut the whole text to ''. Nothing is safe until the text outgrows the hold."""
    tok = _tiny_tokenizer()
    for text, stop, want in (("User: hi", "User:", ""), ("aUser:", "User:", "a"), ("Observation: x", ("x", "Observation:"), "")):
        joined, whole, reason = streamed(tok, text, stop=stop if isinstance(stop, tuple) else (stop,))
        assert (whole, reason) == (want, "stop") and joined == whole, (text, joined, whole)


def test_a_partial_characters_placeholder_is_not_matched_by_a_stop_string():
    """After the first byte of 'é' the decoded text is '\\ufffd', a placeholder for bytes still coming (vLLM's detokenizer
    has emitted nothing yet). A stop '\\ufffd' matched it and ended the choice with '' at the first token, although the
    whole text, 'éA', holds no U+FFFD at all."""
    tok = _tiny_tokenizer()
    joined, whole, reason = streamed(tok, "éA", stop=("\ufffd",))
    assert (whole, reason) == ("éA", "length") and joined == whole


def test_a_character_the_first_min_tokens_tokens_only_began_may_still_hold_a_stop_string():
    """With min_tokens 1, stop strings are looked for in the text after the first token's. That token is the first byte
    of 'é' and added no character (vLLM's text is still ''), so the 'é' the second token completes is looked in and
    ends the choice, as in vLLM; the search started past the placeholder and ran on to the length."""
    tok = _tiny_tokenizer()
    ids = tok("éAB", add_special_tokens=False)["input_ids"]
    state = TextState(tok, SamplingParams(stop=("é",), min_tokens=1), answer_mode=False, max_new_tokens=len(ids))
    for t in ids:
        if state.add(t):
            break
    assert (state.text, state.reason, state.stop_reason, len(state.tokens)) == ("", "stop", "é", 2)


def test_eos_listed_among_stop_token_ids_ends_the_choice_as_eos():
    """vLLM's check_stop tests EOS before stop_token_ids, so stop_token_ids [EOS] ends a choice at EOS with stop_reason
    None, as EOS alone does; with ignore_eos only the list stops it there, and stop_reason is the id. It was the id
    either way."""
    tok = _tiny_tokenizer()
    eos = tok.eos_token_id
    for ignore_eos, want in ((False, None), (True, eos)):
        state = TextState(tok, SamplingParams(stop_token_ids=(eos,), ignore_eos=ignore_eos), answer_mode=False, max_new_tokens=4)
        assert state.add(eos) == "stop" and state.stop_reason == want, (ignore_eos, state.stop_reason)


class _Reads(str):
    """A decoded text that records where each stop-string search starts."""

    starts: list[int] = []

    def find(self, sub, start=0, end=None):
        _Reads.starts.append(start)
        return str.find(self, sub, start, len(self) if end is None else end)


def test_each_token_searches_only_the_text_it_may_have_completed():
    """A stop string wholly inside the text an earlier token's search read was found then: each search starts at the
    last one's end less the stop string's length (vLLM reads the new characters only). Every search started at the
    min_tokens point, the whole text read at every token (O(length × stops) a row and step on the engine thread)."""
    tok = _tiny_tokenizer()
    ids = tok("abcdefgh" * 4, add_special_tokens=False)["input_ids"]
    state = TextState(tok, SamplingParams(stop=("zzz",)), answer_mode=False, max_new_tokens=len(ids))
    assert state.decoded.windowed  # a byte-level decode: it only appends
    push = state.decoded.push
    state.decoded.push = lambda t: _Reads(push(t))
    _Reads.starts = []
    for t in ids:
        state.add(t)
    assert state.text == "abcdefgh" * 4 and state.reason == "length"
    assert _Reads.starts == [max(0, k - 2) for k in range(len(ids))]  # token k+1 may complete 'zzz' from the k-2nd character


def test_the_bounded_search_finds_what_a_search_of_the_whole_text_finds():
    """Stop strings across split characters and tokens, with min_tokens and include_stop_str_in_output, against the rule
    read whole: at each token past min_tokens, the first listed stop string in the text up to its last whole character, from
    the min_tokens point less the stop string's length."""
    import random

    tok = _tiny_tokenizer()
    rnd = random.Random(0)
    alphabet = ["a", "b", "é", "日", "😀", " "]
    for trial in range(300):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 14)))
        stops = tuple({rnd.choice(["a", "é", "日", "😀", "éa", "b日", "a a", "😀b", "\ufffd", "ab😀"]) for _ in range(rnd.randint(1, 3))})
        min_tokens, include = rnd.randint(0, 6), rnd.random() < 0.4
        ids = tok(text, add_special_tokens=False)["input_ids"]
        state = TextState(tok, SamplingParams(stop=stops, min_tokens=min_tokens, include_stop_str_in_output=include),
                          answer_mode=False, max_new_tokens=len(ids))
        for t in ids:
            if state.add(t):
                break
        want, origin = None, 0
        for k in range(1, len(ids) + 1):
            whole = tok.decode(ids[:k])
            settled = len(whole.rstrip("\ufffd"))
            if k <= min_tokens:
                origin = settled
                continue
            hits = [(at, s) for s in stops if (at := whole.find(s, max(0, origin - len(s) + 1), settled)) >= 0]
            if hits:
                at, s = hits[0]  # the first listed (vLLM's order)
                want = (whole[: at + (len(s) if include else 0)], "stop", s, k)
                break
        want = want or (tok.decode(ids), "length", None, len(ids))
        assert (state.text, state.reason, state.stop_reason, len(state.tokens)) == want, (trial, text, stops, min_tokens, include)


def test_a_decode_that_rewrites_earlier_text_is_searched_whole():
    """The bounded search relies on a byte-level decode only appending. transformers' clean-up of spaces rewrites text
    an earlier token ended ("don '" then "don't": the space before the apostrophe goes), so a stop string can appear
    wholly before the last search's end; such a decode is searched whole and the stop string still ends the choice."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    tk.train_from_iterator(["don't do that, I can't. it's fine."] * 20, trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]", "[SEP]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[SEP]", clean_up_tokenization_spaces=True)
    ids = tok("don't do", add_special_tokens=False)["input_ids"]
    assert [tok.decode(ids[: k + 1]) for k in range(3)] == ["don", "don '", "don't"]  # the third token rewrites the first two's text
    state = TextState(tok, SamplingParams(stop=("n'",)), answer_mode=False, max_new_tokens=len(ids))
    assert not state.decoded.windowed
    for t in ids:
        if state.add(t):
            break
    assert (state.text, state.reason, state.stop_reason, len(state.tokens)) == ("do", "stop", "n'", 3)


def test_stop_strings_completed_by_one_token_end_the_choice_at_the_first_listed():
    """vLLM's check_stop_strings reads the stop list in order and ends the choice at the first string the token completed
    (the new characters less each string's length). The token completing '日' completes both '日' and 'b日': listed
    '日' first it ends the text at 'b', listed 'b日' first at ''. The earliest position was taken whatever the order (ties
    by the strings' sort order)."""
    tok = _tiny_tokenizer()
    ids = tok("b日c", add_special_tokens=False)["input_ids"]
    for stops, (text, stop) in ((("日", "b日"), ("b", "日")), (("b日", "日"), ("", "b日")), (("x", "日", "b日"), ("b", "日"))):
        for include in (False, True):
            state = TextState(tok, SamplingParams(stop=stops, include_stop_str_in_output=include), answer_mode=False, max_new_tokens=len(ids))
            for t in ids:
                if state.add(t):
                    break
            got = (state.text, state.reason, state.stop_reason, len(state.tokens))
            assert got == (text + (stop if include else ""), "stop", stop, 4), (stops, include, got)


def test_a_token_that_only_begins_a_character_is_streamed_at_once_and_the_completing_token_carries_it():
    """Each token's entry (logprobs' token text) goes out with the step that made it, as vLLM streams a token's logprobs
    with its step: a token that only begins a character adds no text yet, so its entry is sent at once with '', and the
    token that completes the character carries it ('é' is two tokens here, '日' three)."""
    tok = _tiny_tokenizer()
    ids = tok("é日A", add_special_tokens=False)["input_ids"]
    state = TextState(tok, SamplingParams(), answer_mode=False, max_new_tokens=len(ids) + 1)
    steps = []
    for t in ids:
        state.add(t)
        delta, entries = state.take()
        steps.append((delta, [e.text for e in entries]))
    assert steps == [("", [""]), ("é", ["é"]), ("", [""]), ("", [""]), ("日", ["日"]), ("A", ["A"])]
    assert [e.text for e in state.entries()] == ["", "é", "", "", "日", "A"]
