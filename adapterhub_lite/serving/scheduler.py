"""The scheduler: which waiting requests run at each step, under budgets. It holds no model.

The engine (serving/engine.py) turns each request into a `Ticket` (its adapter, how many tokens its
prompt runs, how many cache positions it may need) and asks `schedule()` once per step for a `Plan`:
which prompts (or chunks of prompts) to prefill now beside the rows that decode. The scheduler only
counts; the engine and its runner (serving/bank.py) do the work. So every budget, the waiting order
and the fairness rule are tested here with no model at all (tests/test_scheduler.py), as vLLM v1
keeps its scheduler apart from its model runner.

Budgets (`Budgets`), each optional but the rows:

- rows: requests decoding or prefilling at once (`--max-batch-rows`, vLLM's max_num_seqs);
- tokens per step (`--max-num-batched-tokens`): a decoding row costs 1, a prefill its prompt's
  tokens; a prompt longer than what is left is run in chunks over several steps (chunked prefill),
  so one long prompt never stalls the rows that decode. A piece that cannot be cut (a prompt whose
  log-probs are scored, a classification, a prompt-tuning adapter's virtual tokens with the first
  token) and is larger than a whole step runs in a step with no other prefill, over the budget;
- cache positions (`--kv-cache-mb`, as tokens): a request reserves its whole need at admission —
  prompt, virtual tokens and every new token it may make — so a running request never runs out of
  cache and nothing is ever preempted. Rows of one pass share one padded tensor laid out as the longest prefix-tuning
  prefix, then the longest run of prompt and new tokens (`Ticket.prefix`): a short prompt behind a long prefix beside a
  long prompt holds both maxima. So rows × (longest prefix + longest rest) is counted: what a prefill pass and the
  dynamic batch hold at most (rows that join it are compacted, Decoding.join), and at least what the static decode
  buffers need (rows compacted: rows × widest row);
- adapters per batch (`--max-loras`): distinct adapters among the rows at once.

A request over a budget waits; it never fails for it (only one that could not fit an empty server,
e.g. needing more cache than the whole budget, is refused at once, with the numbers). Order is
first come, first served: the first waiting request that does not fit stops admission for everyone
behind it, except for the adapter budget, where requests behind it whose adapters are already in the
batch may pass it — at most `patience` steps, after which the queue waits for it (no starvation).
A request whose adapter is still being read from disk (`ready` False) is not considered until it is:
the requests behind it go on, so a cold adapter costs its own request the read and nobody else.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.numbers import is_count


class BudgetError(AdapterHubError):
    """A request that no state of the server could run (it alone exceeds a budget), or budgets that contradict each other."""


# where each budget is set, for its refusal
_WHERE = {"max_rows": "at least 1: --max-batch-rows, Router.run's max_batch_rows", "max_num_batched_tokens": "--max-num-batched-tokens",
          "max_kv_tokens": "cache positions: --kv-cache-mb", "max_loras": "at least 1: --max-loras", "patience": "0 or more steps"}


@dataclass(frozen=True)
class Budgets:
    """What one step and the running batch may hold; None: no bound."""

    max_rows: int = 32
    max_num_batched_tokens: int | None = None
    max_kv_tokens: int | None = None
    max_loras: int | None = None
    patience: int = 8  # steps a request blocked by the adapter budget may be passed by later ones

    def __post_init__(self):
        # every problem at once, as torchtune's config checks do; a count that is no whole number is named alone first
        # (1.5 or True passed `< 1` and ran as a float or 1; "4" was a TypeError from the comparison)
        problems = [f"{name}={value!r}: give a whole number ({_WHERE[name]})" for name, value in self.__dict__.items()
                    if not is_count(value) and (value is not None or name in ("max_rows", "patience"))]
        if problems:
            raise BudgetError("invalid serving budgets: " + "; ".join(problems))
        if self.max_rows < 1:
            problems.append(f"max_rows={self.max_rows}: give at least 1 (--max-batch-rows, Router.run's max_batch_rows)")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_rows:
            problems.append(f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_rows={self.max_rows}: a step must fit one "
                            "decode token per row; raise --max-num-batched-tokens or lower --max-batch-rows")
        if self.max_kv_tokens is not None and self.max_kv_tokens < 1:
            problems.append(f"max_kv_tokens={self.max_kv_tokens}: give a positive cache budget (--kv-cache-mb)")
        if self.max_loras is not None and self.max_loras < 1:
            problems.append(f"max_loras={self.max_loras}: give at least 1 (--max-loras)")
        if self.patience < 0:
            problems.append(f"patience={self.patience}: give 0 or more steps")
        if problems:
            raise BudgetError("invalid serving budgets: " + "; ".join(problems))


@dataclass(eq=False)
class Ticket:
    """What the scheduler knows of one request."""

    key: object  # the engine's name for the request
    adapter: str | None  # None: the plain backbone (takes no adapter slot)
    prompt_tokens: int  # positions the prefill runs (the prompt, and a prompt-tuning adapter's virtual tokens)
    cache_tokens: int  # positions it may hold in the cache at its end: prompt, every virtual token, every new token
    chunkable: bool = True  # False: its prompt runs in one piece (e.g. its prompt is scored)
    first_chunk: int = 1  # the smallest first piece (a prompt-tuning adapter's virtual tokens run with its first token)
    ready: bool = True  # False while its adapter is being read from disk (off the engine thread): it waits, and holds nobody up
    layout: object = None  # rows whose cache columns line up without padding share it (see Scheduler.schedule's can_join)
    sequences: int = 1  # rows of cache_tokens its pass holds at once (a classification scoring multi-token labels: one per label)
    prefix: int = 0  # of cache_tokens, the prefix-tuning virtual tokens: a pass pads every row to the longest prefix, then to the longest rest
    prefilled: int = 0  # prompt positions run so far
    passed: int = 0  # steps in which a later request was admitted before it


@dataclass
class Plan:
    """One step: the rows that decode, and the prompts (or pieces) to prefill, in order."""

    decode: int  # rows that take one decode step
    prefill: list[tuple[Ticket, int]] = field(default_factory=list)  # (ticket, positions to run now)
    blocked: str | None = None  # why the first waiting request waits (for /metrics), None if none waits

    @property
    def tokens(self) -> int:
        return self.decode + sum(n for _, n in self.prefill)


class Scheduler:
    """Waiting, prefilling and running requests, and the budgets they share."""

    def __init__(self, budgets: Budgets = Budgets()):
        self.budgets = budgets
        self.waiting: deque[Ticket] = deque()
        self.prefilling: dict[object, Ticket] = {}  # admitted, prompt partly run (chunked prefill)
        self.running: dict[object, Ticket] = {}  # decoding
        # len(prefilling) + len(running), kept as one number that changes as a request is admitted or leaves (not as it
        # starts decoding): the running gauge reads it from another thread, where the two lengths read one after the
        # other miss (or count twice) a request that moves from one to the other between the reads
        self.admitted = 0

    # -- the requests --------------------------------------------------------------------------------
    def add(self, ticket: Ticket) -> None:
        """Queue a request; BudgetError when it could not run even on an idle server."""
        b = self.budgets
        if b.max_kv_tokens is not None and self._kv([ticket]) > b.max_kv_tokens:
            need = f"{ticket.sequences} sequences (one per label) of {ticket.cache_tokens}" if ticket.sequences > 1 else ticket.cache_tokens
            raise BudgetError(f"the request needs {need} cache positions (prompt, virtual tokens and max_tokens or its labels) but the "
                              f"server's KV cache holds {b.max_kv_tokens} (--kv-cache-mb); lower max_tokens or shorten the prompt")
        self.waiting.append(ticket)

    def requeue(self, ticket: Ticket) -> None:
        """Put an admitted ticket back at the head of the queue (its adapter could not be made resident yet)."""
        self._release(ticket.key)
        ticket.prefilled = 0
        self.waiting.appendleft(ticket)

    def started(self, key) -> None:
        """A prefilled ticket decodes from now on."""
        ticket = self.prefilling.pop(key, None)
        if ticket is not None:
            self.running[key] = ticket

    def finish(self, key) -> None:
        """A request left (answered, failed, cancelled): its budgets are free."""
        self._release(key)
        for t in self.waiting:
            if t.key == key:
                self.waiting.remove(t)
                break

    def _release(self, key) -> None:
        """An admitted request (prefilling or running) is admitted no more."""
        if self.prefilling.pop(key, None) is not None or self.running.pop(key, None) is not None:
            self.admitted -= 1

    def __len__(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    # -- the step ------------------------------------------------------------------------------------
    def kv_reserved(self) -> int:
        """Cache positions the admitted requests reserve: rows × (longest prefix + longest rest), an upper bound of
        what their passes and running batch hold."""
        return self._kv([*self.running.values(), *self.prefilling.values()])

    def _kv(self, tickets) -> int:
        # One padded tensor, the prefixes' columns first, then the prompt and new tokens' (AdapterBank._prepare): a pass
        # of a 6-token prefix with a 1-token prompt beside a 30-token prompt holds 36 columns a row in its prefill and up
        # to 36 + new decoding on the dynamic path, where rows × the widest row counted 30 + new. The maxima may come from
        # different rows.
        prefix = max((t.prefix for t in tickets), default=0)
        rest = max((t.cache_tokens - t.prefix for t in tickets), default=0)
        return sum(t.sequences for t in tickets) * (prefix + rest)

    def schedule(self, can_join: bool = True) -> Plan:
        """The next step. `can_join` False: the runner cannot take rows into a running batch (a cache
        with sliding-window layers), so newcomers wait until the batch is empty and run whole, and only those of one
        `layout` run together: such a cache windows by column, so a row padded after its own tokens (a shorter prompt
        beside a longer one) would lose its first keys from its window too soon."""
        b = self.budgets
        plan = Plan(decode=len(self.running))
        left = None if b.max_num_batched_tokens is None else b.max_num_batched_tokens - plan.decode
        in_batch = [*self.running.values(), *self.prefilling.values()]
        adapters = {t.adapter for t in in_batch if t.adapter is not None}
        # 1. prompts already being prefilled go on first: they hold their budgets already
        for t in self.prefilling.values():
            n = t.prompt_tokens - t.prefilled if left is None else min(left, t.prompt_tokens - t.prefilled)
            if n <= 0:
                break
            plan.prefill.append((t, n))
            left = None if left is None else left - n
        if not can_join and in_batch:
            plan.blocked = "batch" if self.waiting else None
            return self._admit(plan)
        # 2. newcomers, first come first served
        passed: list[Ticket] = []
        for t in list(self.waiting):
            if not t.ready:
                continue
            why = self._why_not(t, in_batch, adapters, left, plan, can_join)
            if not why and not can_join and plan.prefill and t.layout != plan.prefill[0][0].layout:
                why = "layout"  # it starts the next batch, once this one has ended
            if why == "adapters" and t.passed < b.patience:
                passed.append(t)  # later requests whose adapters are in the batch may go before it, for a while
                plan.blocked = plan.blocked or why
                continue
            if why:
                plan.blocked = plan.blocked or why
                break
            # a prompt that must run whole and is over what is left runs alone (see _why_not): that step runs over the budget
            n = t.prompt_tokens if left is None or not (t.chunkable and can_join) else max(min(left, t.prompt_tokens), t.first_chunk)
            plan.prefill.append((t, n))
            left = None if left is None else max(left - n, 0)
            in_batch.append(t)
            if t.adapter is not None:
                adapters.add(t.adapter)
            for p in passed:
                p.passed += 1
            passed = []
        return self._admit(plan)

    def _why_not(self, t: Ticket, in_batch, adapters, left, plan: Plan, can_join: bool) -> str | None:
        """Which budget keeps `t` out of this step (None: it fits)."""
        b = self.budgets
        if len(in_batch) >= b.max_rows:
            return "rows"
        if b.max_kv_tokens is not None and self._kv([*in_batch, t]) > b.max_kv_tokens:
            return "kv_cache"
        if b.max_loras is not None and t.adapter is not None and t.adapter not in adapters and len(adapters) >= b.max_loras:
            return "adapters"
        if left is not None:
            # the smallest piece it can run: a chunk holding its first token (and any virtual tokens), or the whole prompt
            need = t.first_chunk if t.chunkable and can_join else t.prompt_tokens
            if need > left and (plan.prefill or need <= b.max_num_batched_tokens):
                return "tokens"  # waits for room; a piece larger than any step runs in a step with no other prefill, over the budget
        return None

    def _admit(self, plan: Plan) -> Plan:
        for t, n in plan.prefill:
            if t.prefilled == 0 and t in self.waiting:
                self.waiting.remove(t)
                self.prefilling[t.key] = t
                self.admitted += 1
            t.prefilled += n
        return plan
