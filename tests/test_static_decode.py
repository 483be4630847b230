"""Static decode shapes (serving/static.py): rows of every kind that join a running batch mid-way, leave it and
outgrow its buffers still decode exactly as each row alone through plain peft, with the fixed slot pool."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.bank import AdapterBank
from adapterhub_lite.serving.decoding import Decoding
from adapterhub_lite.serving.static import StaticBatch, _bucket, _grow
from tests.test_router_batch import CONFIGS, TINY, ref_logits, rows
from tests.test_router_batch import folders as folders  # noqa: F401 - a fixture: the same peft folders as the bank tests


def _bank(folders, **kwargs):
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model, **kwargs)
    for n in CONFIGS:
        bank.add(n, folders[n])
    return bank


def test_rows_that_join_leave_and_outgrow_the_buffers_equal_peft_per_row(folders):
    # a fixed slot pool: three LoRA slots of rank 8, allocated once (prefix and prompt adapters take no slot)
    bank = _bank(folders, max_loras=3, max_lora_rank=8)
    first = {"a": ("lora_a", 5), "b": ("prefix", 3), "c": (None, 4)}
    later = {"d": ("prompt", 6), "e": ("lora_b", 2), "f": ("prefix_long", 52), "g": ("lora_c", 7)}  # f: 6 + 52 + 12 positions, past the first 64 columns
    ids = dict(zip([*first, *later], rows([5, 3, 4, 6, 2, 52, 7], seed=4)))
    budget = {"a": 3, "b": 9, "c": 6, "d": 4, "e": 8, "f": 12, "g": 2}
    adapter = {k: a for k, (a, _) in {**first, **later}.items()}
    out = {k: [] for k in ids}
    scores = {k: [] for k in ids}

    def record(j, key, tok):
        out[key].append(tok)
        scores[key].append(dec.logits[j].clone())
        return len(out[key]) < budget[key]

    new = bank.start([ids[k] for k in first], [adapter[k] for k in first], keys=list(first))
    dec = bank.batch(new, max_rows=8)
    assert isinstance(dec, StaticBatch) and dec._width == 64
    for _ in range(2):
        assert bank.step(dec, dec.logits.argmax(-1), record)
    dec.join(bank.start([ids[k] for k in later], [adapter[k] for k in later], keys=list(later)))
    assert len(dec) == 7
    widths = {dec._width}
    while bank.step(dec, dec.logits.argmax(-1), record):
        widths.add(dec._width)
    assert widths == {64, 128}, "row f outgrows the first allocation while the others decode"
    assert len(dec) == 0 and dec.logits is None

    worst = 0.0
    for key in ids:
        assert len(out[key]) == budget[key]
        ref = ref_logits(folders, adapter[key], ids[key] + out[key][:-1])[len(ids[key]) - 1:]
        got = torch.stack(scores[key])
        assert [int(t) for t in ref.argmax(-1)] == out[key], key
        worst = max(worst, (got - ref).abs().max().item())
    print(f"static decode vs plain peft per row: max |Δlogit| = {worst:.2e}")
    assert worst <= 1e-4



def test_rows_that_join_decode_under_their_own_adapters_at_the_next_step(folders):
    """A join alone (no row leaving in the same step) renews the batch's slot plan: the newcomer's first decode step runs
    through its own adapter, not the running rows' (in the test above a row always left before the step after a join)."""
    bank = _bank(folders)
    ids = rows([4, 5], seed=9)
    dec = bank.batch(bank.start([ids[0]], ["lora_a"], keys=["a"]), max_rows=4)
    dec.advance(dec.logits.argmax(-1))
    dec.join(bank.start([ids[1]], ["lora_b"], keys=["b"]))
    tokens = dec.logits.argmax(-1)
    dec.advance(tokens)
    want = ref_logits(folders, "lora_b", ids[1] + [int(tokens[1])])[-1]
    assert (dec.logits[1] - want).abs().max().item() <= 1e-4

def test_static_and_dynamic_decoding_give_the_same_logits(folders):
    """The static buffers and the growing cache are two layouts of one computation."""
    bank = _bank(folders)
    names = list(CONFIGS)
    ids = rows([3, 7, 2, 5, 4, 6], seed=5)
    static = bank.generate(ids, names, [6, 2, 5, 4, 6, 3], eos_token_id=-1, output_scores=True)
    dynamic = bank.generate(ids, names, [6, 2, 5, 4, 6, 3], eos_token_id=-1, output_scores=True, static=False)
    assert static[0] == dynamic[0]
    assert max((a - b).abs().max().item() for a, b in zip(static[1], dynamic[1])) <= 1e-4


def test_a_leaving_row_is_replaced_by_the_last_and_freed_rows_are_reset(folders):
    bank = _bank(folders)
    dec = bank.batch(bank.start(rows([3, 4, 5, 6], seed=6), ["lora_a", None, "prefix", "lora_b"], keys="wxyz"), max_rows=4)
    before = {k: (dec._col[i].item(), dec._slot[i].item()) for i, k in enumerate(dec.keys)}
    logits = dict(zip(dec.keys, dec.logits.clone()))
    order = dec.keep([0, 2, 3])  # x leaves: z (the last) takes its row
    assert order == [0, 3, 2] and dec.keys == ["w", "z", "y"]
    assert all(torch.equal(dec.logits[i], logits[k]) for i, k in enumerate(dec.keys))  # each row's logits moved with it, as Decoding.keep's do
    assert {k: (dec._col[i].item(), dec._slot[i].item()) for i, k in enumerate(dec.keys)} == {k: before[k] for k in "wzy"}
    assert dec._live.tolist() == [1, 1, 1, 0] and not dec._mask[3].any() and dec._col[3].item() == 0
    assert dec.keep([]) == [] and dec._live.tolist() == [0, 0, 0, 0] and dec.logits is None


def test_buckets_and_growth():
    assert [_bucket(n) for n in (1, 2, 3, 5, 17, 64)] == [1, 2, 4, 8, 32, 64]
    assert _bucket(40, cap=48) == 48 and _bucket(70, cap=48) == 128  # past the buffer: the batch grows first
    assert _grow(64, 65, 64, None) == 128 and _grow(0, 3, 64, None) == 64 and _grow(64, 10, 64, None) == 64
    assert _grow(64, 90, 64, 96) == 96 and _grow(64, 200, 64, 96) == 200  # a cap, unless one row needs more


def _serve(engine, requests):
    """Drive the engine step by step (as Engine.run does) and return each request's (tokens, log-probs)."""
    from adapterhub_lite.serving.jobs import Job
    from adapterhub_lite.serving.params import SamplingParams

    done = {}

    def listener(i):
        def hear(event, payload):
            if event in ("done", "error"):
                done[i] = payload
        return hear
    for i, (req, n) in enumerate(requests):
        engine._waiting.put_nowait(Job(req, listener(i), SamplingParams(max_tokens=n, logprobs=3, ignore_eos=True)))
    while len(done) < len(requests):
        engine._serve_once()
    assert not [r for r in done.values() if isinstance(r, Exception)]
    return [(done[i].token_ids, [e.logprob for e in done[i].entries]) for i in range(len(requests))]


def test_the_engine_decodes_over_static_buffers_as_over_the_growing_cache(serve_registry):
    """Every kind through the engine, 3 rows at a time, so rows join and leave the running batch; the token
    log-probs equal the dynamic path's (the engine before static shapes) to 1e-4."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.router import Router

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    names = ["gen_a", "cls_ia3", "gen_prefix", "base", "gen_prompt", "gen_b", "cls_b", "cls_prefix"]
    requests = [({"adapter": a, "prompt": f"tell me {i} things"}, 2 + (3 * i) % 7) for i, a in enumerate(names)]
    got = {}
    for mode in (True, False):
        engine = Engine(router, max_batch_rows=3, static_decode=mode)
        got[mode] = _serve(engine, requests)
        info = engine.decode_info()
        assert info["static"] is mode and (info["kv_cache_bytes"] > 0) is mode and info["cuda_graphs"] is False
        if mode:
            assert info["kv_cache_rows"] == 3 and isinstance(engine._static, StaticBatch) and len(engine._static) == 0
    assert [t for t, _ in got[True]] == [t for t, _ in got[False]]
    worst = max(abs(a - b) for (_, x), (_, y) in zip(got[True], got[False]) for a, b in zip(x, y))
    print(f"engine, static vs dynamic decode: max |Δ logprob| = {worst:.2e}")
    assert worst <= 1e-4


def test_decoding_type_is_kept_for_sliding_window_models(folders, monkeypatch):
    """A cache the static buffers cannot stand for (here: faked as not joinable) stays on the dynamic path."""
    bank = _bank(folders)
    new = bank.start(rows([3], seed=1), ["lora_a"])
    monkeypatch.setattr(Decoding, "joinable", property(lambda self: False))  # as a sliding-window model's cache is
    assert not bank.static_ok(new) and isinstance(new, Decoding)
    with pytest.raises(Exception, match="cannot take rows"):
        StaticBatch(bank, 4).join(new)


def test_a_join_that_runs_out_of_memory_fails_nobody_and_leaves_the_batch_as_it_was(serve_registry, monkeypatch, caplog):
    """Growing the cache for a newcomer runs out of memory once, beside running rows: the running rows keep their
    buffers and go on, the newcomer waits until a row leaves and is admitted then, and every answer equals the run
    without the failure (tokens; log-probs to float noise, as the batches differ)."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.router import Router
    from adapterhub_lite.serving.scheduler import Budgets

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    requests = [({"adapter": a, "prompt": f"say {i} words"}, 6 + i) for i, a in enumerate(["gen_a", "gen_prefix", "base", "gen_prompt", "gen_b"])]
    budgets = Budgets(max_rows=8, max_num_batched_tokens=40)  # a few prompts a step: later ones join running rows
    want = _serve(Engine(router, budgets=budgets), requests)
    grow, failed = StaticBatch._reserve, []

    def reserve(self, rows, width, like):
        if self._rows and rows > self._rows and not failed:  # the first growth in rows, with rows running
            failed.append((len(self), rows))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return grow(self, rows, width, like)
    monkeypatch.setattr(StaticBatch, "_reserve", reserve)
    got = _serve(Engine(router, budgets=budgets), requests)
    assert failed and failed[0][0] > 0, failed  # it happened beside running rows
    assert "waits for rows to leave" in caplog.text
    assert [t for t, _ in got] == [t for t, _ in want]
    assert max(abs(a - b) for (_, x), (_, y) in zip(got, want) for a, b in zip(x, y)) <= 1e-5


class _ReplayedStep:
    """A stand-in for a CUDA graph on the CPU: 'capture' leaves the batch's row state as it found it (a real capture
    runs nothing) and each replay runs the captured step again into the same output tensor. What it checks is
    everything a replay depends on besides the GPU: the step reads only buffers (a live plan, no cached gathers),
    padding rows of a bucket change nothing, and the bookkeeping (verification, invalidation, fallback)."""

    def __init__(self, batch, fn, wrong=False):
        self.batch, self.fn, self.wrong = batch, fn, wrong

    def record(self):
        b = self.batch
        saved = b._col.clone(), b._pos.clone(), b._mask.clone()
        out = self.fn()
        b._col.copy_(saved[0]), b._pos.copy_(saved[1]), b._mask.copy_(saved[2])
        self.out = out
        return self, out

    def replay(self):
        self.out.copy_(self.fn() + (1.0 if self.wrong else 0.0))


def _graphs_on(bank, monkeypatch, wrong=False):
    captured = []

    def record(self, fn):
        captured.append(self)
        return _ReplayedStep(self, fn, wrong).record()
    monkeypatch.setattr(StaticBatch, "_record", record)
    return captured


def test_replayed_steps_over_padded_buckets_equal_the_eager_steps(folders, monkeypatch, caplog):
    """The graph path (bucketed rows and columns, padding rows, a live slot plan read from a device buffer) on the
    CPU, with each replay re-running the captured step: every kind, rows leaving, gives the eager tokens and logits,
    and loading an adapter drops the captured steps."""
    bank = _bank(folders, max_loras=3, max_lora_rank=8)
    names = ["lora_a", "prefix", None, "prompt", "lora_b", "prefix_long", "lora_c"]
    ids = rows([5, 3, 4, 6, 2, 7, 3], seed=7)
    budget = [9, 4, 7, 2, 6, 5, 8]
    want, want_scores = bank.generate(ids, names, budget, eos_token_id=-1, output_scores=True)
    _graphs_on(bank, monkeypatch)
    new = bank.start(ids, names)
    dec = bank.batch(new, max_rows=8)
    dec.graphs = True  # as on a GPU
    out, scores = [[] for _ in ids], [[] for _ in ids]

    def record(j, key, tok):
        out[key].append(tok)
        scores[key].append(dec.logits[j].clone())
        return len(out[key]) < budget[key]
    shapes, live = [], []
    while bank.step(dec, dec.logits.argmax(-1), record):
        shapes.append(dec._shape)
        live.append(len(dec))
        assert not dec._col[len(dec):].any() and not dec._pos[len(dec):].any()  # padding rows stay at column 0
    assert out == want and dec.graphs
    assert max((torch.stack(a) - b).abs().max().item() for a, b in zip(scores, want_scores)) <= 1e-4
    # rows in powers of two up to the 7 allocated, columns in powers of two; steps with padding rows among them
    assert {B for B, _ in shapes} == {7, 4, 2, 1} and all(W & (W - 1) == 0 for _, W in shapes), shapes
    assert any(B > n for (B, _), n in zip(shapes, live))
    assert dec.captured == len(set(shapes))
    # a catalogue change (here: an adapter removed) drops the captured steps
    before = dec._graph_state()
    bank.remove("lora_c")
    assert dec._graph_state() != before


class _HostReads(TorchFunctionMode):
    """Records what would stop a step from being captured as a CUDA graph or make its replays wrong, run on the CPU:
    a value read back to the host (`.item()`, `.tolist()`, `bool(t)`, a boolean-mask index, `nonzero`: each a device
    sync, which fails a capture) and a tensor made from host data (`torch.tensor(list)`: baked into the graph as it
    was at capture, so replays would read stale values)."""

    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
             "unique", "unique_consecutive", "repeat_interleave", "tensor", "as_tensor", "from_numpy"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        bool_index = name in ("__getitem__", "__setitem__", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _flat(args[1:2]))
        if name in self.READS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _flat(items) -> list:
    out = []
    for item in items:
        out.extend(_flat(item) if isinstance(item, (tuple, list)) else [item])
    return out


def test_the_captured_step_reads_nothing_back_to_the_host(folders, monkeypatch):
    """What a graph captures (StaticBatch._step under a live plan: LoRA, prefix, prompt and base rows, padding rows, rows leaving) neither
    reads a device value on the host nor builds a tensor from host values. On a GPU either one fails the capture
    (decoding eager from then on: correct, but host-bound) or freezes a value into every replay; the CPU tests
    above cannot see that, so this one watches the step's tensor calls."""
    bank = _bank(folders, max_loras=3, max_lora_rank=8)
    names = ["lora_a", "prefix", None, "prompt", "lora_b", "prefix_long", "lora_c"]
    ids = rows([5, 3, 4, 6, 2, 7, 3], seed=7)
    budget = [9, 4, 7, 2, 6, 5, 8]
    watch = _HostReads()
    steps = []

    def record(self, fn):
        def watched():
            steps.append(1)
            with watch:
                return fn()
        return _ReplayedStep(self, watched).record()
    monkeypatch.setattr(StaticBatch, "_record", record)
    dec = bank.batch(bank.start(ids, names), max_rows=8)
    dec.graphs = True
    out = [[] for _ in ids]

    def take(j, key, tok):
        out[key].append(tok)
        return len(out[key]) < budget[key]
    while bank.step(dec, dec.logits.argmax(-1), take):
        pass
    assert dec.graphs and dec.captured >= 3 and len(steps) > dec.captured  # captures and replays were watched
    assert watch.seen == [], f"the captured decode step reads on the host: {sorted(set(watch.seen))}"


def test_a_replay_that_disagrees_with_the_eager_step_switches_graphs_off(folders, monkeypatch, caplog):
    bank = _bank(folders)
    ids, names = rows([4, 5], seed=8), ["lora_a", "prefix"]
    want = bank.generate(ids, names, 4, eos_token_id=-1)
    _graphs_on(bank, monkeypatch, wrong=True)
    dec = bank.batch(bank.start(ids, names), max_rows=2)
    dec.graphs = True
    out = [[], []]

    def record(j, key, tok):
        out[key].append(tok)
        return len(out[key]) < 4
    while bank.step(dec, dec.logits.argmax(-1), record):
        pass
    assert out == want and not dec.graphs and dec.captured == 0
    assert "not used (max |graph - eager| = 1" in caplog.text


def _tiny_mistral(folder):
    """A random 2-layer Mistral with a sliding window of 8 (the tiny Llama's tokenizer), loaded as a backbone."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from adapterhub_lite.model.backbone import load_backbone
    from adapterhub_lite.model.weights import resolve

    tok = AutoTokenizer.from_pretrained(resolve(TINY)[0])
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, sliding_window=8)
    MistralForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_backbone(str(folder), "none", dtype="fp32")


def test_a_sliding_window_model_runs_a_prompt_longer_than_a_step_whole_as_transformers_decodes_it(tmp_path):
    """A sliding-window cache takes neither rows mid-way nor a prompt in pieces (Decoding.extend refuses it). With a
    batch running the scheduler knew (can_join False: newcomers run whole), but an idle engine had no batch to ask and
    cut a prompt longer than --max-num-batched-tokens into pieces, whose second failed the request ('cannot take a
    prompt in pieces'). Each prompt now runs whole (alone, over the step's budget, as any piece that cannot be cut),
    and its tokens are transformers' own greedy decode over its sliding-window cache."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.router import Router
    from adapterhub_lite.serving.scheduler import Budgets

    backbone = _tiny_mistral(tmp_path)
    router = Router(backbone)
    assert not router.bank.joinable
    prompts = [list(range(5, 17)), list(range(40, 50))]  # 12 and 10 tokens: past the window, and past a step of 4
    got = _serve(Engine(router, budgets=Budgets(max_rows=4, max_num_batched_tokens=4)),
                 [({"adapter": "base", "prompt_ids": ids}, 6) for ids in prompts])
    for ids, (tokens, _) in zip(prompts, got):
        want = backbone.model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(ids):]
        assert tokens == want.tolist()


def test_the_static_buffers_stay_within_the_kv_cache_budget_and_decode_as_without_one(serve_registry, monkeypatch):
    """--kv-cache-mb bounded what the rows reserve (rows × their widest reservation) but not the buffers holding them:
    they doubled past it and kept the widest width and the most rows ever asked for, so a 200-position budget held
    1 × 256 after one long request and 8 × 256 after eight short ones (10 × the budget). Every allocation now fits
    the budget (rows × columns), shrinking the width when more rows need less of it, with rows joining running ones,
    and every answer is the one served with no budget."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.router import Router
    from adapterhub_lite.serving.scheduler import Budgets

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    budget = 200
    prompt = [5, 9, 14, 3]
    long = [({"adapter": "gen_a", "prompt_ids": prompt}, budget - len(prompt))]  # the whole budget, alone
    # then rows of every kind that fit beside each other in a few ways (a prefix adapter's virtual tokens count too)
    mixed = [({"adapter": a, "prompt_ids": prompt[: 1 + i % 4]}, n) for i, (a, n) in
             enumerate([("gen_a", 90), ("base", 60), ("gen_prefix", 20), ("gen_prompt", 12), ("gen_b", 30), ("base", 8), ("gen_a", 16)])]
    want = [_serve(Engine(router, budgets=Budgets(max_rows=8)), reqs) for reqs in (long, mixed)]
    sizes, reserve = [], StaticBatch._reserve

    def recorded(self, rows, width, like):
        reserve(self, rows, width, like)
        sizes.append((self._rows, self._width))
    monkeypatch.setattr(StaticBatch, "_reserve", recorded)
    engine = Engine(router, budgets=Budgets(max_rows=8, max_kv_tokens=budget))
    got = [_serve(engine, reqs) for reqs in (long, mixed)]
    assert max(r * w for r, w in sizes) <= budget, sizes
    assert len({r for r, _ in sizes}) > 1 and len({w for _, w in sizes}) > 1, sizes  # it grew in rows and changed width
    assert [[t for t, _ in run] for run in got] == [[t for t, _ in run] for run in want]


def test_a_sliding_window_model_batches_only_rows_whose_columns_line_up_and_each_decodes_as_alone(tmp_path):
    """A sliding-window layer windows keys by cache column. Rows prefilled together are right-padded to the longest,
    so a 3-token prompt beside a 14-token one decoded its new tokens 11 columns past its own and lost its first keys
    from the window (window 8) too soon: other tokens than its own forward's (log-probs 0.09 off on the tiny Mistral).
    Such a model now starts together only rows of one layout (prompt positions and prefix); rows of equal length
    still share a batch, and each row's tokens and log-probs are the model's own forward over its prompt and answer."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.router import Router
    from adapterhub_lite.serving.scheduler import Budgets

    backbone = _tiny_mistral(tmp_path)
    engine = Engine(Router(backbone), budgets=Budgets(max_rows=4))
    prompts = [[5, 6, 7], [60, 61, 62], list(range(40, 54))]
    rows, step = [], engine._step

    def counted():
        rows.append(len(engine._dec))
        step()
    engine._step = counted
    got = _serve(engine, [({"adapter": "base", "prompt_ids": ids}, 8) for ids in prompts])
    assert max(rows) == 2 and engine.metrics.waits.labels(budget="layout")._value.get() > 0  # the two 3-token rows together
    for ids, (tokens, logprobs) in zip(prompts, got):
        with torch.no_grad():
            own = backbone.model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].log_softmax(-1)
        assert tokens == own.argmax(-1).tolist()
        assert max(abs(lp - own[i, t].item()) for i, (t, lp) in enumerate(zip(tokens, logprobs))) <= 1e-4


def test_a_capped_growth_never_cuts_the_live_rows_columns(folders):
    """max_positions narrows the width only as far as the live rows allow: a row of 60 columns running when a short
    one joins under a cap of 100 keeps its columns (the engine's scheduler never admits this; a caller without one
    gets a batch over its cap, decoding right, rather than a copy that does not fit)."""
    bank = _bank(folders)
    ids = rows([60, 5], seed=2)
    dec = bank.batch(bank.start([ids[0]], ["lora_a"], keys=["long"]), max_rows=8, max_positions=100)
    dec.join(bank.start([ids[1]], ["prefix"], keys=["short"]))
    assert dec._width >= 61 and dec.lengths == [60, 5 + bank.virtual_tokens("prefix")]
    tokens = dec.logits.argmax(-1)
    dec.advance(tokens)  # over the copied columns
    ref = ref_logits(folders, "lora_a", ids[0] + [int(tokens[0])])[-1]
    assert (dec.logits[0] - ref).abs().max().item() <= 1e-4


def test_a_sliding_window_model_whose_prefill_ran_out_of_memory_answers_every_request(tmp_path, monkeypatch):
    """A prefill pass of several rows that raises is retried in halves (Admission._parts). On a sliding-window model
    the first half started a batch that takes no rows mid-way, and the second half's join failed its requests
    ('cannot take rows mid-way') though nothing was wrong with them. They now wait for that batch to end, as the
    scheduler has such newcomers wait, and every request gets the model's own greedy tokens."""
    from adapterhub_lite.serving.engine import Engine
    from adapterhub_lite.serving.router import Router
    from adapterhub_lite.serving.scheduler import Budgets

    backbone = _tiny_mistral(tmp_path)
    router = Router(backbone)
    start, passes = router.bank.start, []

    def out_of_memory_once(input_ids, *args, **kwargs):  # the first pass, of all four rows, runs out of memory
        passes.append(len(input_ids))
        if len(passes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return start(input_ids, *args, **kwargs)
    monkeypatch.setattr(router.bank, "start", out_of_memory_once)
    prompts = [list(range(5 + 10 * i, 15 + 10 * i)) for i in range(4)]  # one layout (10 tokens): prefilled together
    got = _serve(Engine(router, budgets=Budgets(max_rows=4)), [({"adapter": "base", "prompt_ids": ids}, 5) for ids in prompts])
    assert passes[:2] == [4, 2] and sum(passes[1:]) == 4, passes  # the halves; the second ran once the first's batch ended
    for ids, (tokens, _) in zip(prompts, got):
        want = backbone.model.generate(torch.tensor([ids]), max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, len(ids):]
        assert tokens == want.tolist()
