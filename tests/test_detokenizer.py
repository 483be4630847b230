"""serving/output.py's Detokenizer: the text of a choice's growing tokens equals `tokenizer.decode` of all of them at
every token (a partial character's U+FFFD included), while a byte-level tokenizer is read in short windows, not whole."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from adapterhub_lite.model.weights import _tiny_tokenizer
from adapterhub_lite.serving.output import Detokenizer, TextState, prompt_pieces
from adapterhub_lite.serving.params import SamplingParams


def _metaspace():
    """A SentencePiece-style tokenizer (Metaspace): decoding a window drops its leading space, so it is decoded whole."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tk.train_from_iterator(["Hello world, the château is big.", "a b c d e f g", "世界 hello 🙂 tokens"] * 20,
                           trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _sequences(tok, rng):
    """Real text (multi-byte characters split across tokens), a start mid-character, and random ids with specials."""
    yield tok("Hello, world! château 世界 🙂  a\n\nb\t" * 2, add_special_tokens=False)["input_ids"]
    yield tok("é世🙂ü" * 4, add_special_tokens=False)["input_ids"][1:]
    for _ in range(30):
        ids = [rng.randrange(len(tok)) for _ in range(30)] + tok.all_special_ids
        rng.shuffle(ids)
        yield ids


@pytest.mark.parametrize("make, windowed", [(_tiny_tokenizer, True), (_metaspace, False)])
def test_the_text_is_the_whole_decode_at_every_token(make, windowed):
    tok, rng = make(), random.Random(0)
    for ids in _sequences(tok, rng):
        for skip in (True, False):
            d = Detokenizer(tok, skip)
            assert d.windowed is windowed
            for k, t in enumerate(ids):
                assert d.push(t) == tok.decode(ids[: k + 1], skip_special_tokens=skip), (ids[: k + 1], skip)


def test_a_byte_level_choice_is_decoded_in_windows_not_whole(monkeypatch):
    """Decoding every token's whole list again made each step O(length) per row on the engine thread."""
    tok = _tiny_tokenizer()
    ids = tok("a long answer, é and 世界 too " * 20, add_special_tokens=False)["input_ids"]
    read, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda x, **kw: read.append(len(x)) or decode(x, **kw))
    d = Detokenizer(tok, True)
    for t in ids:
        text = d.push(t)
    assert text == decode(ids, skip_special_tokens=True) and len(ids) > 500
    assert max(read) <= 8  # the window: the last finished piece as context (世: 3 tokens here) and the bytes since


def test_a_plain_fast_tokenizer_is_read_through_its_rust_decode(monkeypatch):
    """transformers' decode wraps the Rust decode in Python (~9 µs a call, two calls per row and token on the engine
    thread); a plain fast tokenizer without clean-up is decoded by its backend, to the same text."""
    tok = _tiny_tokenizer()
    ids = tok("a long answer, é and 世界 too " * 3, add_special_tokens=False)["input_ids"] + tok.all_special_ids
    whole = [tok.decode(ids[: k + 1], skip_special_tokens=True) for k in range(len(ids))]
    d = Detokenizer(tok, True)
    monkeypatch.setattr(type(tok), "_decode", lambda *a, **kw: pytest.fail("the engine thread went through transformers' decode"))
    assert [d.push(t) for t in ids] == whole


def test_a_sentencepiece_completion_keeps_the_space_its_first_token_starts_with():
    """Metaspace drops the space that starts a decoded list, so a completion decoded alone read ' the château' as 'the
    château': prompt + text was not the prompt continued ('Hello world,the'). After the prompt's last tokens (vLLM's
    detokenizer) the text is what the completion adds to the prompt, at every token; a byte-level one is unchanged."""
    for tok in (_metaspace(), _tiny_tokenizer()):
        prompt = tok("Hello world,", add_special_tokens=False)["input_ids"]
        ids = tok("Hello world, the château is big.", add_special_tokens=False)["input_ids"][len(prompt):]
        assert tok.decode(prompt + ids) == "Hello world, the château is big."
        d = Detokenizer(tok, True, context=prompt)
        for k, t in enumerate(ids):
            assert d.push(t) == tok.decode(prompt + ids[: k + 1])[len("Hello world,"):]
        assert d.text == " the château is big."
        state = TextState(tok, SamplingParams(), answer_mode=False, max_new_tokens=len(ids), prompt_ids=prompt)  # the engine's way in
        for t in ids:
            state.add(t)
        assert state.text == " the château is big."


def test_an_echoed_prompts_pieces_leave_out_the_bos_its_tokenizer_added():
    """A SentencePiece tokenizer that adds '<s>' decodes '<s>', ' The', …: the text sent ('The …') was not their join, since
    the decoder puts a space after '<s>' that no token of the text holds. The BOS adds "", the rest is decoded without it."""
    from tokenizers.processors import TemplateProcessing

    for tok in (_metaspace(), _tiny_tokenizer()):
        tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
        text = "Hello world, the château"
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.decode(ids) != text
        pieces = prompt_pieces(tok, ids, text)
        assert pieces[0] == "" and "".join(pieces) == text and len(pieces) == len(ids)
        assert prompt_pieces(tok, ids) == prompt_pieces(tok, ids, tok.decode(ids))  # the decoded prompt: pieces as before


def test_an_echoed_prompt_a_sentencepiece_tokenizer_reads_lossily_still_joins_to_the_text_sent():
    """Metaspace reads ' Hello' as 'Hello' ('▁Hello'): no decoded piece holds the space the text starts with, so the echoed
    pieces joined to 'Hello world' and every text_offset was one character off the echoed ' Hello world'. The pieces come
    from the text's own offsets now; a character split over tokens belongs to the token that completes it."""
    from tokenizers.processors import TemplateProcessing

    for bos in (False, True):
        tok = _metaspace()
        if bos:
            tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
        for text in (" Hello world", "  Hello", " é世🙂ü x", "\nHello"):
            ids = tok(text)["input_ids"]
            assert tok.decode(ids, skip_special_tokens=True) != text  # what the pieces were joined from
            pieces = prompt_pieces(tok, ids, text)
            assert "".join(pieces) == text and len(pieces) == len(ids), (bos, text, pieces)
        assert prompt_pieces(tok, tok(" Hello world")["input_ids"], " Hello world")[-4:] == [" Hello", " wor", "l", "d"]
        assert [p for p in prompt_pieces(tok, tok(" é世🙂ü x")["input_ids"], " é世🙂ü x") if p] == [" ", "é", "世", "🙂", "ü", " ", "x"]
    other = _metaspace()("Goodbye")["input_ids"]  # ids that are not the text's encoding: the pieces stay as decoded
    assert prompt_pieces(_metaspace(), other, " Hello") == prompt_pieces(_metaspace(), other)

