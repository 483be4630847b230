"""The hand-written per-row sampler (serving/sampling.py) against transformers' logits processors, in vLLM's order.

transformers' processors take one setting for a whole batch, so the server applies each row's own by hand; these
tests hold every row's shaped logits, kept tokens, probabilities and draws equal to what the processors give for
that row alone (vLLM's order where it differs from `generate`'s), and greedy rows to the argmax of the shaped logits.
"""

import random

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from adapterhub_lite.serving.params import GREEDY_BELOW, SamplingParams, sampling_params
from adapterhub_lite.serving.protocol import ApiError
from adapterhub_lite.serving.sampling import choose, filtered_probs, shape_logits

V, EOS = 50, 2


class Row:
    """What the sampler reads of a row (the engine's Job has these)."""

    def __init__(self, params, prompt=(), out=(), generator=None):
        self.params, self._prompt, self.tokens, self.generator = params, list(prompt), list(out), generator

    @property
    def prompt_ids(self):
        return self._prompt


def reference_shape(x, p, prompt, out, eos=EOS):
    """transformers' processors, one row, in vLLM's order: allowed ids, logit_bias, min_tokens, penalties.
    frequency/presence: OpenAI's definition over the completion (transformers has no such processor)."""
    ids, s, width = torch.tensor([list(prompt) + list(out)]), x[None].float().clone(), x.shape[-1]
    if p.allowed_token_ids is not None:
        s = SuppressTokensLogitsProcessor([t for t in range(width) if t not in p.allowed_token_ids], device="cpu")(ids, s)
    if p.logit_bias:
        s = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias.items()})(ids, s)
    banned = list(p.stop_token_ids) + ([] if p.ignore_eos or eos is None else [eos])
    if p.min_tokens and banned:
        s = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, banned, device="cpu")(ids, s)
    if p.repetition_penalty != 1.0:  # over prompt + completion: vLLM's rule, and generate's input_ids are just that
        s = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, s)
    if out:
        counts = torch.bincount(torch.tensor(list(out)), minlength=width).float()
        s = s - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return s[0]


def reference_probs(x, p, order=("min_p", "top_k", "top_p")):
    """transformers' warpers after the temperature, in vLLM's order by default (generate's is top_k, top_p, min_p)."""
    made = {"min_p": MinPLogitsWarper(p.min_p) if p.min_p > 0 else None,
            "top_k": TopKLogitsWarper(p.top_k) if p.top_k > 0 else None,
            "top_p": TopPLogitsWarper(p.top_p) if p.top_p < 1 else None}
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(p.temperature))] + [made[k] for k in order if made[k]])
    return warpers(torch.zeros(1, 1, dtype=torch.long), x[None].float().clone()).softmax(-1)[0]


def same_logits(a, b):
    inf = torch.isinf(a)
    return torch.equal(inf, torch.isinf(b)) and torch.equal(a[inf], b[inf]) and torch.allclose(a[~inf], b[~inf], atol=1e-5, rtol=1e-5)


def random_case(rng):
    """Random logits (with many ties a third of the time), histories and settings: each alone and in combinations."""
    kind = rng.random()
    x = torch.randint(-3, 4, (V,)).float() if kind < 0.25 else torch.zeros(V) if kind < 0.33 else torch.randn(V) * rng.choice([0.5, 2, 8])
    prompt = [rng.randrange(V) for _ in range(rng.randrange(0, 8))]
    out = [rng.randrange(V) for _ in range(rng.randrange(0, 8))]
    kw = {"temperature": rng.choice([0.0, GREEDY_BELOW / 2, GREEDY_BELOW, 1e-4, 0.3, 0.7, 1.5, 2.0]) if rng.random() < 0.5 else 1.0}
    if rng.random() < 0.4:
        kw["top_p"] = rng.choice([0.1, 0.25, 0.5, 0.9, 1.0, rng.random() or 1.0])
    if rng.random() < 0.4:
        kw["top_k"] = rng.choice([1, 2, 5, V - 1, V, V + 1, 1000])
    if rng.random() < 0.4:
        kw["min_p"] = rng.choice([0.05, 0.1, 0.5, 1.0, rng.random()])
    if rng.random() < 0.3:
        kw["repetition_penalty"] = rng.choice([0.5, 1.2, 2.0, 10.0])
    if rng.random() < 0.3:
        kw["frequency_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.3:
        kw["presence_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.3:
        kw["logit_bias"] = {rng.randrange(V): rng.uniform(-100, 100) for _ in range(rng.randrange(1, 5))}
    if rng.random() < 0.2:
        kw["allowed_token_ids"] = tuple(rng.sample(range(V), rng.randrange(1, 10)))
    if rng.random() < 0.2:
        kw.update(min_tokens=rng.randrange(1, 10), stop_token_ids=tuple(rng.sample(range(V), 2)), ignore_eos=rng.random() < 0.3)
    return x, prompt, out, SamplingParams(**kw)


def test_each_rows_shaped_logits_kept_tokens_and_probabilities_equal_transformers_processors():
    rng = random.Random(0)
    torch.manual_seed(0)
    checked = {"greedy": 0, "sampled": 0}
    for _ in range(800):
        x, prompt, out, p = random_case(rng)
        ref = reference_shape(x, p, prompt, out)
        if torch.isinf(ref).all():
            continue  # every token masked: refused when the request is read (test_params_refuse_a_row_with_no_token_left)
        # the row among others with other settings: each row is shaped with its own
        other = SamplingParams(temperature=0.5, repetition_penalty=3.0, logit_bias={1: 50.0})
        batch = torch.stack([torch.randn(V), x, torch.randn(V)])
        shaped = shape_logits(batch, [Row(other, [1, 3], [4]), Row(p, prompt, out), Row(SamplingParams())], EOS)
        assert same_logits(shaped[1], ref), p
        assert torch.equal(shaped[2], batch[2]), "a row that sets nothing is unchanged"
        if p.greedy:
            assert int(shaped[1].argmax()) == int(ref.argmax())
            checked["greedy"] += 1
            continue
        ours, theirs = filtered_probs(shaped[1], p), reference_probs(ref, p)
        assert torch.equal(ours > 0, theirs > 0), p  # the same kept set, ties at the top_k / top_p boundary included
        assert torch.allclose(ours, theirs, atol=1e-6) and abs(float(ours.sum()) - 1) < 1e-5, p
        checked["sampled"] += 1
    assert min(checked.values()) > 50, checked


def test_top_p_keeps_the_smallest_set_reaching_it_with_ties_at_the_boundary():
    """Four equal tokens: 0.5 is reached by two of them, so two are kept (vLLM's and transformers' rule);
    the cut used to keep one more whenever a prefix summed to exactly top_p."""
    for top_p, kept in [(0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4), (1.0, 4)]:
        probs = filtered_probs(torch.zeros(4), SamplingParams(temperature=1.0, top_p=top_p))
        assert int((probs > 0).sum()) == kept, top_p
        assert torch.allclose(probs[probs > 0], torch.full((kept,), 1 / kept))  # renormalized over the kept set
    # logits 2, 1, 1, 0 (bf16 logits tie often): top_p exactly the top token's probability keeps only it
    x = torch.tensor([2.0, 1.0, 1.0, 0.0])
    top = float(x.softmax(-1)[0])
    assert int((filtered_probs(x, SamplingParams(temperature=1.0, top_p=top)) > 0).sum()) == int((reference_probs(x, SamplingParams(temperature=1.0, top_p=top)) > 0).sum())


def test_min_p_applies_after_the_temperature_and_before_top_p_as_vllm_does():
    """transformers' generate applies min_p last (after top_k/top_p); vLLM before them, so top_p's nucleus is
    taken over what min_p kept. Probabilities 0.4, 0.3, 0.2, 0.1; min_p 0.5 keeps 0.4 and 0.3 (both ≥ 0.2), which
    renormalize to 4/7, 3/7; top_p 0.5 then keeps only the first. generate's order keeps both (0.4 < 0.5)."""
    x = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    p = SamplingParams(temperature=1.0, min_p=0.5, top_p=0.5)
    assert (filtered_probs(x, p) > 0).tolist() == [True, False, False, False]
    assert (reference_probs(x, p, order=("top_k", "top_p", "min_p")) > 0).tolist() == [True, True, False, False]
    # the temperature first: at T = 0.5 the probabilities sharpen to 16:9:4:1, and min_p 0.3 keeps 16 and 9 (≥ 4.8)
    assert (filtered_probs(x, SamplingParams(temperature=0.5, min_p=0.3)) > 0).tolist() == [True, True, False, False]
    assert (filtered_probs(x, SamplingParams(temperature=2.0, min_p=0.6)) > 0).tolist() == [True, True, True, False]  # sqrt: .63 .55 .45 .32


@pytest.mark.parametrize("top_k", [-1, 0, 4, 5, 1000])
def test_top_k_off_or_at_least_the_vocabulary_keeps_every_token(top_k):
    p = sampling_params({"top_k": top_k, "temperature": 1.0}, "completions", vocab=4, max_tokens_limit=100)  # -1: vLLM's "off"
    probs = filtered_probs(torch.tensor([3.0, 1.0, 0.5, -2.0]), p)
    assert bool((probs > 0).all()) and torch.allclose(probs, torch.tensor([3.0, 1.0, 0.5, -2.0]).softmax(-1))


def test_draws_follow_the_expected_distribution():
    """20k seeded draws through choose() against transformers' probabilities: Pearson's chi-square stays well
    under its 0.1% critical value (31.3 at 11 degrees of freedom), and no filtered token is ever drawn."""
    logits = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 1.5
    for kw, n in [({"temperature": 1.0}, 20000),
                  ({"temperature": 0.9, "top_p": 0.9, "top_k": 6, "min_p": 0.1, "repetition_penalty": 1.3, "frequency_penalty": 0.4,
                    "presence_penalty": 0.2, "logit_bias": {3: 2.0}}, 4000)]:
        p = SamplingParams(**kw)
        row = Row(p, [1, 2, 3], [3, 3, 5], torch.Generator().manual_seed(1234))
        counts = torch.zeros(12)
        for _ in range(n):
            counts[int(choose(logits[None], [row], eos_id=None)[0])] += 1
        x = reference_shape(logits, p, row.prompt_ids, row.tokens, eos=None)
        expect = reference_probs(x, p)
        kept = expect > 0
        chi2 = float(((counts - n * expect)[kept] ** 2 / (n * expect[kept])).sum())
        assert chi2 < 31.3 and bool((counts[~kept] == 0).all()), (kw, chi2, counts.tolist(), expect.tolist())
        assert float((counts / n - expect).abs().max()) < 0.02


def test_greedy_is_the_argmax_of_the_shaped_logits_and_a_tiny_temperature_still_samples():
    torch.manual_seed(0)
    x = torch.randn(3, V)
    for t in (0.0, GREEDY_BELOW / 2):
        # the bias and penalties apply before the argmax (vLLM): token 7 wins by its bias, the best token loses to
        # its repetition penalty
        best = int(x[1].argmax())
        p = SamplingParams(temperature=t, logit_bias={7: 100.0})
        q = SamplingParams(temperature=t, repetition_penalty=10.0, presence_penalty=2.0)
        rows = [Row(p), Row(q, [best], [best]), Row(SamplingParams(temperature=t))]
        got = choose(x, rows, EOS).tolist()
        penalized = int(reference_shape(x[1], q, [best], [best]).argmax())
        assert int(x[0].argmax()) != 7 and got[0] == 7
        assert got[1] == penalized != best
        assert got[2] == int(x[2].argmax())
    # at the threshold the row samples; 1e-5 still gives a finite distribution (logits / 1e-5 stay float32)
    p = SamplingParams(temperature=GREEDY_BELOW)
    assert not p.greedy
    probs = filtered_probs(x[0] * 30, p)
    assert bool(torch.isfinite(probs).all()) and int(probs.argmax()) == int(x[0].argmax()) and float(probs.max()) > 0.999
    draws = {int(choose(x[:1], [Row(p, generator=torch.Generator().manual_seed(s))], EOS)[0]) for s in range(20)}
    assert draws == {int(x[0].argmax())}


def test_params_refuse_a_row_with_no_token_left():
    """Every allowed token a stop token masked before min_tokens: refused when the request is read (400 naming it);
    EOS joins the check where the engine reads the request (tests/test_sampling_seeds.py)."""
    body = {"allowed_token_ids": [7, 9], "stop_token_ids": [9, 7], "min_tokens": 2, "max_tokens": 5}
    with pytest.raises(ApiError, match=r"`allowed_token_ids` is \[7, 9\]; .*min_tokens \(2\).*no token is left") as e:
        sampling_params(body, "completions", vocab=V, max_tokens_limit=100)
    assert e.value.status == 400 and e.value.param == "allowed_token_ids"
    for ok in ({"min_tokens": 0}, {"allowed_token_ids": [7, 8]}, {"stop_token_ids": [9]}):
        sampling_params({**body, **ok}, "completions", vocab=V, max_tokens_limit=100)


@pytest.mark.parametrize("key", ["²", "٣", "1e3", "", "300"])
def test_logit_bias_keys_are_ascii_token_ids(key):
    """A key str.isdigit() takes but int() does not ('²') was a bare ValueError (a 500), and '٣' read as token 3."""
    with pytest.raises(ApiError, match=r"`logit_bias` is .*is not a token id of this model \(0 to 299\)") as e:
        sampling_params({"logit_bias": {key: 1}}, "completions", vocab=300, max_tokens_limit=10)
    assert e.value.status == 400
    assert sampling_params({"logit_bias": {"007": 1, "299": -100}}, "completions", vocab=300, max_tokens_limit=10).logit_bias == {7: 1.0, 299: -100.0}
