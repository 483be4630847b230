"""The scheduler alone, driven by a fake runner: budgets hold at every step, requests over a budget wait and
all finish, order is first come first served, and nobody starves. No model is involved."""

import random
import re

import pytest

from adapterhub_lite.serving.scheduler import BudgetError, Budgets, Scheduler, Ticket


def run(budgets, arrivals, new_tokens, *, can_join=True, max_steps=2000):
    """Drive a Scheduler as the engine does: arrivals[step] are queued, each plan's pieces are 'prefilled',
    running rows decode one token per step and leave after new_tokens[key]. Returns the per-step log."""
    s = Scheduler(budgets)
    left, log, first_seen = {}, [], {}
    pending = {k: list(v) for k, v in arrivals.items()}
    for step in range(max_steps):
        for t in pending.pop(step, []):
            s.add(t)
        plan = s.schedule(can_join=can_join or not s.running)
        held = [*s.running.values(), *s.prefilling.values()]
        log.append({"plan": plan, "rows": len(held), "kv": len(held) * max((t.cache_tokens for t in held), default=0),
                    "adapters": {t.adapter for t in held if t.adapter}, "waiting": len(s.waiting)})
        for t, _ in plan.prefill:
            first_seen.setdefault(t.key, step)
        for key in list(s.running):  # decode: one token each
            left[key] -= 1
            if left[key] == 0:
                s.finish(key)
        for t, _ in plan.prefill:
            if t.prefilled >= t.prompt_tokens:
                s.started(t.key)
                left[t.key] = new_tokens[t.key]
        assert s.admitted == len(s.running) + len(s.prefilling)  # the running gauge's one number
        if not pending and not len(s):
            return log, first_seen
    raise AssertionError(f"not done after {max_steps} steps: {len(s.waiting)} waiting, {len(s.running)} running")


def test_admitted_counts_the_prefilling_and_running_requests_through_every_move():
    """`admitted` (what /metrics' running gauge reads from another thread, in one read) is len(prefilling) + len(running)
    after each move: admitted, started, sent back to wait, finished from each state; unchanged as a prompt starts to decode."""
    s = Scheduler(Budgets(max_rows=4, max_num_batched_tokens=8))
    a, b, c = Ticket("a", None, 4, 8), Ticket("b", None, 12, 16), Ticket("c", None, 2, 4)
    for t in (a, b, c):
        s.add(t)
    seen = []

    def check():
        assert s.admitted == len(s.prefilling) + len(s.running)
        seen.append(s.admitted)

    s.schedule()  # a whole, b's first piece: both admitted, c waits for tokens
    check()
    s.started("a")
    check()
    s.requeue(b)  # b back to the queue's head (its adapter not resident yet)
    check()
    s.finish("c")  # c left while waiting
    s.finish("a")  # a left while running
    check()
    s.schedule()
    check()
    s.finish("b")  # b left while prefilling
    s.finish("b")  # and a second finish changes nothing
    check()
    assert seen == [2, 2, 1, 0, 1, 0] and not len(s)


def tickets(n, prompt=8, new=4, adapters=None, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = prompt if isinstance(prompt, int) else rng.randint(*prompt)
        k = new if isinstance(new, int) else rng.randint(*new)
        out.append(Ticket(i, None if adapters is None else adapters[i % len(adapters)], p, p + k))
    return out, {t.key: t.cache_tokens - t.prompt_tokens for t in out}


def test_budgets_list_every_problem_at_once():
    with pytest.raises(BudgetError) as err:
        Budgets(max_rows=0, max_num_batched_tokens=-1, max_kv_tokens=0, max_loras=0, patience=-1)
    for word in ("max_rows=0", "max_num_batched_tokens=-1", "max_kv_tokens=0", "max_loras=0", "patience=-1"):
        assert word in str(err.value)


def test_rows_budget_admits_in_arrival_order():
    ts, new = tickets(20, new=(1, 9))
    log, first = run(Budgets(max_rows=4), {0: ts}, new)
    assert max(e["rows"] for e in log) == 4
    order = sorted(first, key=lambda k: (first[k], k))
    assert order == list(range(20))  # first come, first served


def test_token_budget_chunks_long_prompts_and_always_leaves_room_to_decode():
    ts, new = tickets(12, prompt=(3, 90), new=(1, 6), seed=1)
    budget = 32
    log, _ = run(Budgets(max_rows=8, max_num_batched_tokens=budget), {0: ts[:6], 5: ts[6:]}, new)
    assert all(e["plan"].tokens <= budget for e in log)
    assert any(t.prompt_tokens > budget for t in ts)  # some prompts only ever ran in pieces
    pieces = {}
    for e in log:
        for t, n in e["plan"].prefill:
            pieces.setdefault(t.key, []).append(n)
    assert {k: sum(v) for k, v in pieces.items()} == {t.key: t.prompt_tokens for t in ts}  # every position ran once
    assert any(len(v) > 1 for v in pieces.values())


def test_a_prompt_that_runs_whole_waits_for_a_step_of_its_own_then_runs_over_the_budget():
    s = Scheduler(Budgets(max_rows=4, max_num_batched_tokens=16))
    s.add(Ticket("a", None, 10, 12))
    s.add(Ticket("b", None, 12, 14, chunkable=False))
    plan = s.schedule()
    assert [(t.key, n) for t, n in plan.prefill] == [("a", 10)]  # b would not fit beside a, and may not be cut
    s.started("a")
    plan = s.schedule()
    assert [(t.key, n) for t, n in plan.prefill] == [("b", 12)]  # 1 decode + 12 <= 16
    s.started("b")
    s.add(Ticket("c", None, 17, 20, chunkable=False))  # larger than any step: it runs alone, over the budget
    s.add(Ticket("d", None, 2, 4))
    plan = s.schedule()
    assert [(t.key, n) for t, n in plan.prefill] == [("c", 17)] and plan.tokens == 19


def test_kv_budget_makes_requests_wait_never_fail_and_counts_the_padded_batch():
    ts, new = tickets(30, prompt=(4, 40), new=(1, 20), seed=2)
    need = sum(t.cache_tokens for t in ts)
    budget = max(t.cache_tokens for t in ts) * 3
    assert budget < need / 2
    log, first = run(Budgets(max_rows=16, max_kv_tokens=budget), {0: ts}, new)
    assert len(first) == 30  # every request ran
    assert all(e["kv"] <= budget for e in log)
    assert max(e["waiting"] for e in log) > 0  # some waited


def test_a_request_over_the_whole_kv_budget_is_refused_with_its_numbers():
    s = Scheduler(Budgets(max_kv_tokens=100))
    with pytest.raises(BudgetError, match="needs 101 cache positions.*holds 100"):
        s.add(Ticket(0, None, 50, 101))
    assert not len(s)


def test_adapter_budget_bounds_distinct_adapters_and_lets_requests_of_present_ones_pass_for_a_while():
    adapters = ["a", "b", "c", "d", "e"]
    ts, new = tickets(40, new=(2, 8), adapters=adapters, seed=3)
    log, first = run(Budgets(max_rows=8, max_loras=2), {0: ts}, new)
    assert all(len(e["adapters"]) <= 2 for e in log)
    assert len(first) == 40
    # some request was passed by a later one whose adapter was in the batch (not strict FIFO) ...
    assert any(first[i] > first[j] for i in first for j in first if i < j)


def test_no_starvation_under_a_stream_of_requests_for_the_running_adapters():
    """'z' arrives behind a steady stream for adapters a and b (the two slots): after `patience` steps the queue waits for it."""
    def stream():
        out = {step: [Ticket(f"s{step}", "ab"[step % 2], 4, 10)] for step in range(200)}
        out[3].append(Ticket("z", "z", 4, 10))
        return out
    new = {t.key: 6 for ts in stream().values() for t in ts}
    log, first = run(Budgets(max_rows=8, max_loras=2, patience=5), stream(), new)
    assert first["z"] - 3 <= 5 + 8  # patience, then the running rows drain (6 new tokens each)
    _, strict = run(Budgets(max_rows=8, max_loras=2, patience=0), stream(), new)  # strict first come first served
    assert strict["z"] <= first["z"]
    _, unbounded = run(Budgets(max_rows=8, max_loras=2, patience=10**9), stream(), new)
    assert unbounded["z"] >= 199  # what the patience bound prevents: z runs only once the stream stops


def test_without_joining_newcomers_wait_for_the_batch_to_end():
    ts, new = tickets(6, new=5)
    log, first = run(Budgets(max_rows=4), {0: ts[:2], 1: ts[2:]}, new, can_join=False)
    assert first[2] > first[0] + 4  # the second group started after the first group finished
    assert all(not e["plan"].prefill or e["rows"] - len(e["plan"].prefill) == 0 or all(t.prefilled > n for t, n in e["plan"].prefill) for e in log)


def test_requeued_ticket_goes_back_to_the_head():
    s = Scheduler(Budgets(max_rows=1))
    s.add(Ticket("a", "x", 4, 8))
    s.add(Ticket("b", "y", 4, 8))
    (t, _), = s.schedule().prefill
    s.requeue(t)
    assert [w.key for w in s.waiting] == ["a", "b"] and t.prefilled == 0
    assert s.schedule().prefill[0][0].key == "a"


def test_a_first_piece_never_splits_virtual_tokens_from_the_first_token():
    s = Scheduler(Budgets(max_rows=2, max_num_batched_tokens=4))
    s.add(Ticket("p", "prompt_tuned", 9, 12, first_chunk=6))  # 5 virtual tokens run with the prompt's first token
    (t, n), = s.schedule().prefill
    assert n == 6  # larger than the step, alone in it
    (t, n), = s.schedule().prefill
    assert n == 3 and t.prefilled == 9


def test_a_request_whose_reservation_is_exactly_the_kv_budget_runs():
    """The cache budget is a bound, not a strict one: a request that needs exactly what the server holds is accepted and
    admitted (a `>=` in either check would refuse it or leave it waiting forever), and two rows that together fill it run at once."""
    s = Scheduler(Budgets(max_kv_tokens=100))
    s.add(Ticket("whole", None, 50, 100))
    assert [(t.key, n) for t, n in s.schedule().prefill] == [("whole", 50)]
    s = Scheduler(Budgets(max_kv_tokens=100))
    s.add(Ticket("a", None, 10, 50))
    s.add(Ticket("b", None, 10, 50))  # 2 rows × 50 = 100
    assert [t.key for t, _ in s.schedule().prefill] == ["a", "b"] and s.kv_reserved() == 100


def test_a_request_blocked_by_the_adapter_budget_is_passed_exactly_patience_times():
    """`patience` steps in which later requests (whose adapter is in the batch) go first, then the queue waits for it."""
    s = Scheduler(Budgets(max_rows=8, max_loras=1, patience=2))
    s.add(Ticket("a0", "a", 4, 100))
    s.schedule()
    s.started("a0")
    s.add(Ticket("z", "z", 4, 10))  # needs a second adapter: over max_loras while a0 runs
    admitted = []
    for i in range(1, 6):
        s.add(Ticket(f"a{i}", "a", 4, 100))
        plan = s.schedule()
        admitted.append([t.key for t, _ in plan.prefill])
        for t, _ in plan.prefill:
            s.started(t.key)
        assert plan.blocked == "adapters"
    assert admitted == [["a1"], ["a2"], [], [], []]


def test_a_request_whose_adapter_is_being_read_holds_nobody_up():
    s = Scheduler(Budgets(max_rows=4))
    cold = Ticket("cold", "x", 4, 8, ready=False)
    s.add(cold)
    s.add(Ticket("warm", "y", 4, 8))
    assert [t.key for t, _ in s.schedule().prefill] == ["warm"]
    cold.ready = True  # read: it runs at the next step
    assert [t.key for t, _ in s.schedule().prefill] == ["cold"]


def test_a_request_that_leaves_while_waiting_leaves_the_queue():
    s = Scheduler(Budgets(max_rows=1))
    for key in "abc":
        s.add(Ticket(key, None, 4, 8))
    s.schedule()
    s.finish("b")  # cancelled while it waited
    assert [t.key for t in s.waiting] == ["c"] and len(s) == 2
    s.finish("a")
    assert [t.key for t, _ in s.schedule().prefill] == ["c"]


def test_a_piece_larger_than_any_step_waits_for_a_step_with_no_other_prefill():
    s = Scheduler(Budgets(max_rows=4, max_num_batched_tokens=16))
    s.add(Ticket("d", None, 2, 4))
    s.add(Ticket("c", None, 17, 20, chunkable=False))
    assert [(t.key, n) for t, n in s.schedule().prefill] == [("d", 2)]  # beside d the step would hold 19 tokens
    s.started("d")
    plan = s.schedule()
    assert [(t.key, n) for t, n in plan.prefill] == [("c", 17)] and plan.tokens == 18  # alone, over the budget


def test_a_first_piece_that_does_not_fit_what_is_left_waits_for_the_next_step():
    """A prompt-tuning request's first piece (its virtual tokens with the first token) is its smallest: beside another
    prefill it waits when that piece is over what is left, rather than pushing the step over the token budget."""
    s = Scheduler(Budgets(max_rows=4, max_num_batched_tokens=8))
    s.add(Ticket("a", None, 6, 10))
    s.add(Ticket("p", "prompt_tuned", 9, 12, first_chunk=4))
    plan = s.schedule()
    assert [(t.key, n) for t, n in plan.prefill] == [("a", 6)] and plan.tokens <= 8 and plan.blocked == "tokens"
    s.started("a")
    plan = s.schedule()
    assert [(t.key, n) for t, n in plan.prefill] == [("p", 7)] and plan.tokens == 8  # 1 decode + 7


def test_the_kv_reservation_counts_prompts_still_in_pieces():
    """A request being prefilled in pieces holds its whole reservation from its first piece (/metrics' kv_reserved)."""
    s = Scheduler(Budgets(max_rows=4, max_num_batched_tokens=4))
    s.add(Ticket("long", None, 10, 20))
    s.schedule()
    assert "long" in s.prefilling and s.kv_reserved() == 20


def test_without_joining_only_rows_of_one_layout_start_together_first_come_first_served():
    """A cache that cannot take rows mid-way (sliding-window layers) windows by column, so rows padded after their own
    tokens must not share its batch: with can_join False only newcomers of the first one's layout start with it, and
    the first of another layout waits (and everyone behind it) for the next batch."""
    s = Scheduler(Budgets(max_rows=8))
    for key, layout in enumerate([(0, 3), (0, 3), (0, 14), (0, 3)]):
        s.add(Ticket(key, None, layout[1], layout[1] + 4, layout=layout))
    plan = s.schedule(can_join=False)
    assert [t.key for t, _ in plan.prefill] == [0, 1] and plan.blocked == "layout"
    for key in (0, 1):
        s.started(key)
        s.finish(key)
    assert [t.key for t, _ in s.schedule(can_join=False).prefill] == [2]
    assert all(t.layout is None for t in tickets(2)[0]) and len(Scheduler().schedule(can_join=True).prefill) == 0


def test_a_pass_of_several_sequences_reserves_each_of_them():
    """A classification scoring multi-token labels runs one sequence per label, each of its width: the cache holds
    them all at once. It counted as one row, so a 2-label request of width 60 passed a budget of 100 (120 held) and
    beside a running row of 40 reserved 120 where 180 are held."""
    with pytest.raises(BudgetError, match="2 sequences .* of 60 cache positions.*holds 100"):
        Scheduler(Budgets(max_kv_tokens=100)).add(Ticket("cls", None, 120, 60, chunkable=False, sequences=2))
    s = Scheduler(Budgets(max_kv_tokens=170))
    s.add(Ticket("gen", None, 8, 40))
    s.schedule()
    s.started("gen")
    s.add(Ticket("cls", None, 120, 60, chunkable=False, sequences=2))
    assert s.schedule().blocked == "kv_cache" and s.kv_reserved() == 40  # 3 × 60 = 180 > 170: it waits
    s.finish("gen")
    assert [t.key for t, _ in s.schedule().prefill] == ["cls"] and s.kv_reserved() == 120


def test_the_kv_count_pads_every_row_to_the_longest_prefix_and_the_longest_rest():
    """A pass lays each row out as the longest prefix, then the longest prompt and new tokens: a 6-token prefix with a
    1-token prompt beside a 30-token prompt (5 new tokens each) holds 2 × (6 + 35) = 82 positions. It was counted as
    rows × the widest row, 2 × 35 = 70, so a budget of 70 admitted both beside each other."""
    def queued(budget):
        s = Scheduler(Budgets(max_kv_tokens=budget))
        s.add(Ticket("prefix", "p", 1, 6 + 1 + 5, prefix=6))
        s.add(Ticket("long", "q", 30, 30 + 5))
        return s
    s = queued(81)
    plan = s.schedule()
    assert [t.key for t, _ in plan.prefill] == ["prefix"] and plan.blocked == "kv_cache" and s.kv_reserved() == 12
    s = queued(82)
    assert len(s.schedule().prefill) == 2 and s.kv_reserved() == 82
    assert Scheduler()._kv([Ticket(0, None, 3, 10, prefix=4)]) == 10  # alone, a row holds its own reservation


@pytest.mark.parametrize("name, value", [("max_rows", 1.5), ("max_rows", True), ("max_rows", "4"), ("max_rows", None), ("max_loras", 2.0),
                                         ("max_num_batched_tokens", True), ("max_kv_tokens", "64"), ("patience", 0.5)])
def test_a_budget_that_is_no_whole_number_is_refused_naming_it(name, value):
    # 1.5 and True passed `max_rows < 1` and were run as budgets; "4" and None were a TypeError from the comparison
    with pytest.raises(BudgetError, match=rf"^invalid serving budgets: {name}={re.escape(repr(value))}: give a whole number \("):
        Budgets(**{name: value})
