"""Chat messages as vLLM reads them before the template: what the template renders is what vLLM would render."""

from adapterhub_lite.model.weights import _tiny_tokenizer
from adapterhub_lite.serving import protocol as P


def test_text_parts_are_joined_with_a_newline_as_vllm_joins_them():
    """The openai client sends content as [{"type": "text", "text": ...}, ...]; vLLM joins the parts with "\\n" for a
    template that reads content as a string (SmolLM2's, the tiny one's), so the same chat gives the same prompt ids."""
    tok = _tiny_tokenizer()
    parts = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}]
    as_vllm = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "part one\npart two"}]
    assert P.check_messages(parts) == as_vllm
    assert (tok.apply_chat_template(P.check_messages(parts), add_generation_prompt=True)
            == tok.apply_chat_template(as_vllm, add_generation_prompt=True))
