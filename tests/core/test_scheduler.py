"""Scheduler + KV cache manager + block pool + radix prefix cache, without weights.

A fake runner stands in for the model: it "writes KV" by recording (token id, position) in each
slot the block tables point at, checks that every slot a request attends to holds exactly its
own token at that position (so a wrong block table, a shared block overwritten, or a prefix-cache
hit with the wrong content is caught), and samples a token that is a pure function of the
request's tokens so far (so recomputation after preemption must reproduce the same output).
`check_integrity()` runs after every step.
"""
from __future__ import annotations

import random
import time

import pytest

from ember.config import SchedulerConfig
from ember.core.block_pool import BlockPool
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.prefix_cache import RadixPrefixCache
from ember.core.request import Request, RequestStatus
from ember.core.scheduler import Scheduler
from ember.sampling_params import SamplingParams

VOCAB = 1000


def fake_token(token_ids: list[int]) -> int:
    h = 7
    for t in token_ids:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


class Harness:
    def __init__(self, num_blocks: int, block_size: int = 4, max_num_seqs: int = 8,
                 budget: int = 32, max_model_len: int = 256, prefix: bool = False,
                 policy: str = "fcfs") -> None:
        self.cache = RadixPrefixCache() if prefix else None
        self.kv = KVCacheManager(num_blocks, block_size, self.cache)
        self.config = SchedulerConfig(max_num_seqs, budget, max_model_len, policy)
        self.sched = Scheduler(self.config, self.kv)
        self.bs = block_size
        self.slots: dict[int, tuple[int, int]] = {}     # slot → (token id, position) written there
        self.ids = 0
        self.steps: list = []                           # per step: [(request id, num new tokens)]
        self.preempted: list[str] = []
        self.finished: list[Request] = []

    def add(self, prompt: list[int], parent: Request | None = None, rid: str | None = None,
            **params) -> Request:
        params.setdefault("max_tokens", 4)
        rid = rid or f"r{self.ids}"
        self.ids += 1
        req = Request(rid, list(prompt), SamplingParams(**params), max_model_len=self.config.max_model_len,
                      parent=parent)
        self.sched.add(req)
        return req

    def add_n(self, prompt: list[int], n: int, **params) -> list[Request]:
        """n > 1 as the engine does it: siblings whose parent is the first."""
        parent = self.add(prompt, rid=f"r{self.ids}#0", **params)
        return [parent] + [self.add(prompt, parent=parent, rid=f"r{self.ids}#{i}", **params)
                           for i in range(1, n)]

    def _run_one(self, req: Request, n: int) -> None:
        table = self.kv.block_table(req.request_id)
        start, end, bs = req.num_computed_tokens, req.num_computed_tokens + n, self.bs
        assert n >= 1 and end <= req.num_tokens
        assert len(table) >= -(-end // bs), "block table does not cover the scheduled tokens"
        assert len(set(table)) == len(table), "a block appears twice in one table"
        for pos in range(start, end):
            block = table[pos // bs]
            assert self.kv.pool.ref_count[block] == 1, "writing into a shared block"
            assert self.cache is None or block not in self.cache.nodes, "writing into a cached block"
            self.slots[block * bs + pos % bs] = (req.all_token_ids[pos], pos)
        for pos in range(end):
            slot = table[pos // bs] * bs + pos % bs
            assert self.slots.get(slot) == (req.all_token_ids[pos], pos), \
                f"{req.request_id}: KV of position {pos} is wrong"

    def step(self):
        out = self.sched.schedule()
        self.preempted += [r.request_id for r in out.preempted]
        assert out.num_prefill_tokens <= self.config.max_num_batched_tokens
        assert all(s.num_new_tokens == 1 for s in out.scheduled if s.decode)
        assert len(self.sched.running) <= self.config.max_num_seqs
        assert len({s.request.request_id for s in out.scheduled}) == len(out.scheduled)
        for r in out.preempted:
            assert r.status == RequestStatus.WAITING and r.num_computed_tokens == 0
            assert r.request_id not in self.kv.tables
        sampled = []
        for s in out.scheduled:
            assert s.request.status == RequestStatus.RUNNING
            self._run_one(s.request, s.num_new_tokens)
            sampled.append(fake_token(s.request.all_token_ids) if s.samples else None)
        self.steps.append([(s.request.request_id, s.num_new_tokens) for s in out.scheduled])
        self.finished += self.sched.update(out, sampled)
        self.kv.check_integrity()
        return out

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished:
                return
            out = self.step()
            # a step may only preempt; the next one must then schedule something
            assert out or out.preempted, "the scheduler made no progress with requests outstanding"
        raise AssertionError("did not finish")

    def assert_all_free(self) -> None:
        self.kv.check_integrity()
        assert not self.kv.tables
        assert all(c == 0 for c in self.kv.pool.ref_count)
        evictable = self.cache.num_evictable if self.cache else 0
        assert self.kv.pool.num_free + evictable == self.kv.num_blocks


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(fake_token(toks))
    return toks[len(prompt):]


def prompt_of(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


# ---- block pool ---------------------------------------------------------------------------

def test_block_pool_contract():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    with pytest.raises(MemoryError):
        pool.allocate(2)
    pool.retain(a[:1])
    pool.release(a)
    assert pool.num_free == 3 and pool.ref_count[a[0]] == 1
    pool.release(a[:1])
    assert pool.num_free == 4 and pool.free_ids() == {0, 1, 2, 3}
    with pytest.raises(RuntimeError):
        pool.release(a[:1])


# ---- chunked prefill and the token budget -----------------------------------------------

def test_chunked_prefill_respects_budget_and_samples_on_last_chunk():
    h = Harness(num_blocks=64, block_size=4, budget=16)
    req = h.add(prompt_of(50, 0), max_tokens=3)
    chunks = []
    while h.sched.has_unfinished:
        out = h.step()
        assert len(out.scheduled) == 1
        s = out.scheduled[0]
        chunks.append(s.num_new_tokens)
    assert chunks == [16, 16, 16, 2, 1, 1]
    # only the chunk that reaches the end of the prompt samples
    assert req.output_token_ids == expected_output(req.prompt_token_ids, 3)
    assert req.status == RequestStatus.FINISHED_LENGTH
    h.assert_all_free()


def test_prefill_budget_is_fully_used_and_decodes_ride_along():
    h = Harness(num_blocks=256, block_size=4, budget=24, max_num_seqs=16)
    reqs = [h.add(prompt_of(5 + 7 * i, i), max_tokens=5) for i in range(8)]
    while h.sched.has_unfinished:
        decoding = [r for r in h.sched.running if r.num_tokens - r.num_computed_tokens == 1]
        prefill_left = sum(r.num_tokens - r.num_computed_tokens for r in h.sched.running
                           if r not in decoding) + sum(r.num_tokens for r in h.sched.waiting)
        out = h.step()
        # every sequence that decodes gets its token, outside the budget; prefill chunks use
        # the whole budget, and nothing is left on the table
        assert sorted(s.request.request_id for s in out.scheduled if s.decode) == \
            sorted(r.request_id for r in decoding)
        assert out.num_prefill_tokens == min(24, prefill_left)
        assert out.num_tokens == len(decoding) + min(24, prefill_left)
    for r in reqs:
        assert r.output_token_ids == expected_output(r.prompt_token_ids, 5)
    h.assert_all_free()


def test_running_requests_come_first_then_fcfs():
    h = Harness(num_blocks=256, block_size=4, budget=10, max_num_seqs=8)
    a = h.add(prompt_of(30, 1), max_tokens=2)
    b = h.add(prompt_of(3, 2), max_tokens=2)
    first = h.step()
    assert [(s.request, s.num_new_tokens) for s in first.scheduled] == [(a, 10)]
    second = h.step()        # a (running) keeps its chunk before b may start
    assert [(s.request, s.num_new_tokens) for s in second.scheduled] == [(a, 10)]
    h.run()
    assert a.output_token_ids == expected_output(a.prompt_token_ids, 2)
    assert b.output_token_ids == expected_output(b.prompt_token_ids, 2)


def test_fcfs_order_and_max_num_seqs():
    h = Harness(num_blocks=256, block_size=4, budget=64, max_num_seqs=3)
    reqs = [h.add(prompt_of(6, i), max_tokens=4) for i in range(10)]
    started: list[str] = []
    while h.sched.has_unfinished:
        out = h.step()
        assert len(out.scheduled) <= 3
        for s in out.scheduled:
            if s.request.request_id not in started:
                started.append(s.request.request_id)
    assert started == [r.request_id for r in reqs]
    assert [r.request_id for r in h.finished] == [r.request_id for r in reqs]
    assert max(len(s) for s in h.steps) == 3
    h.assert_all_free()


# ---- preemption ----------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [False, True])
def test_preempts_newest_and_recomputes_same_output(prefix):
    # 3 requests of 8-token prompts growing to 8 + 12 = 20 tokens = 5 blocks each; 10 blocks.
    h = Harness(num_blocks=10, block_size=4, budget=64, max_num_seqs=8, prefix=prefix)
    reqs = [h.add(prompt_of(8, 10 + i), max_tokens=12) for i in range(3)]
    first_preempted = None
    while h.sched.has_unfinished:
        running_before = list(h.sched.running)
        out = h.step()
        if out.preempted and first_preempted is None:
            first_preempted = out.preempted[0]
            # the newest running request is the victim, and it goes back to the queue head
            assert first_preempted is running_before[-1]
            assert h.sched.waiting[0] is first_preempted
    assert first_preempted is not None, "the pool was sized to force a preemption"
    assert first_preempted.num_preemptions >= 1
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_output(r.prompt_token_ids, 12)
    h.assert_all_free()


def test_waiting_request_never_preempts_running_ones():
    h = Harness(num_blocks=6, block_size=4, budget=64)
    a = h.add(prompt_of(16, 1), max_tokens=6)       # 4 blocks now, 6 at the end
    h.step()
    b = h.add(prompt_of(12, 2), max_tokens=1)       # needs 3 blocks: only 2 free
    h.step()
    assert b.status == RequestStatus.WAITING and a.status == RequestStatus.RUNNING
    assert not h.preempted
    h.run()
    assert a.output_token_ids == expected_output(a.prompt_token_ids, 6)
    assert b.output_token_ids == expected_output(b.prompt_token_ids, 1)
    h.assert_all_free()


def test_max_model_len_ends_a_request():
    h = Harness(num_blocks=64, block_size=4, budget=64, max_model_len=20)
    req = h.add(prompt_of(13, 5), max_tokens=None)
    h.run()
    assert req.status == RequestStatus.FINISHED_LENGTH and req.num_tokens == 20
    assert req.output_token_ids == expected_output(req.prompt_token_ids, 7)
    h.assert_all_free()


def test_abort_running_and_waiting_frees_blocks():
    h = Harness(num_blocks=16, block_size=4, budget=8, max_num_seqs=1)
    a = h.add(prompt_of(20, 6), max_tokens=4)
    b = h.add(prompt_of(6, 7), max_tokens=4)
    h.step()                                 # a is mid-prefill, b waits
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    h.sched.finish(a, RequestStatus.FINISHED_ABORTED)
    h.kv.check_integrity()
    assert a.finish_reason == "abort" and a.request_id not in h.kv.tables
    h.sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not h.sched.has_unfinished
    h.assert_all_free()


# ---- n > 1: siblings share the prompt's full blocks ----------------------------------------

def test_siblings_share_prompt_blocks():
    h = Harness(num_blocks=64, block_size=4, budget=64)
    sibs = h.add_n(prompt_of(10, 3), 3, max_tokens=3)
    h.step()
    h.step()
    tables = [h.kv.block_table(r.request_id) for r in sibs]
    assert all(r.status == RequestStatus.RUNNING for r in sibs)
    # the two full prompt blocks are shared, the partial third block is each one's own
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3
    assert h.kv.pool.ref_count[tables[0][0]] == 3
    assert sibs[1].num_cached_tokens == 8
    h.run()
    h.assert_all_free()


# ---- prefix cache ----------------------------------------------------------------------------

def test_prefix_cache_hit_reuses_full_blocks():
    h = Harness(num_blocks=64, block_size=4, budget=64, prefix=True)
    shared = prompt_of(12, 4)
    a = h.add(shared + [1, 2], max_tokens=2)
    h.run()
    b = h.add(shared + [3, 4, 5], max_tokens=2)
    h.step()
    assert b.num_cached_tokens == 12
    assert h.kv.block_table(b.request_id)[:3] == h.cache.match(shared)
    h.run()
    # an identical prompt that is exactly 3 blocks long still computes its last token
    c = h.add(shared, max_tokens=2)
    h.step()
    assert c.num_cached_tokens == 8
    h.run()
    assert c.output_token_ids == expected_output(shared, 2)
    assert a.output_token_ids == expected_output(a.prompt_token_ids, 2)
    assert h.cache.hit_tokens >= 20
    h.assert_all_free()


def test_prefix_cache_evicts_least_recently_used_first():
    h = Harness(num_blocks=8, block_size=4, budget=64, prefix=True)
    prompts = [prompt_of(9, 20 + i) for i in range(3)]      # 2 full blocks cached each
    for p in prompts:
        h.add(p, max_tokens=1)
        h.run()
        time.sleep(0.002)
    blocks = {i: h.cache.match(p[:8]) for i, p in enumerate(prompts)}   # touches 0, 1, 2
    time.sleep(0.002)
    h.cache.match(prompts[0][:8])                          # 0 is now the most recent
    assert all(len(b) == 2 for b in blocks.values())
    evictable_before = h.cache.num_evictable
    freed = h.cache.evict(2)
    assert freed == 2 and h.cache.num_evictable == evictable_before - 2
    cached = h.cache.cached_blocks()
    assert set(blocks[1]).isdisjoint(cached), "the least recently used prefix goes first"
    assert set(blocks[0]) <= cached and set(blocks[2]) <= cached
    h.kv.check_integrity()


def test_prefix_cache_evicts_leaves_before_their_parents():
    h = Harness(num_blocks=16, block_size=4, budget=64, prefix=True)
    p = prompt_of(13, 30)                                  # 3 full blocks: a chain
    h.add(p, max_tokens=1)
    h.run()
    chain = h.cache.match(p[:12])
    assert len(chain) == 3
    h.cache.evict(1)
    assert h.cache.match_len(p) == 8 and chain[2] not in h.cache.cached_blocks()
    h.kv.check_integrity()


def test_prefix_cache_never_evicts_held_blocks():
    h = Harness(num_blocks=8, block_size=4, budget=64, prefix=True)
    a = h.add(prompt_of(16, 40), max_tokens=8)            # 4 full prompt blocks, cached while running
    h.step()
    held = list(h.kv.block_table(a.request_id))
    assert set(held[:4]) <= h.cache.cached_blocks()
    assert h.cache.evict(100) == 0                         # all of them are referenced
    b = h.add(prompt_of(16, 41), max_tokens=2)             # cannot fit beside a
    h.run()
    assert a.output_token_ids == expected_output(a.prompt_token_ids, 8)
    assert b.output_token_ids == expected_output(b.prompt_token_ids, 2)
    h.assert_all_free()


def test_cache_aware_policy_still_serves_everyone():
    h = Harness(num_blocks=64, block_size=4, budget=16, max_num_seqs=2, prefix=True,
                policy="cache_aware")
    shared = prompt_of(16, 50)
    h.add(shared + [1], max_tokens=1)
    h.run()
    reqs = [h.add(prompt_of(6, 60 + i), max_tokens=2) for i in range(3)]
    reqs += [h.add(shared + [2 + i], max_tokens=2) for i in range(40)]
    h.run()
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    h.assert_all_free()


# ---- a long random workload: nothing leaks -----------------------------------------------

@pytest.mark.parametrize("prefix", [False, True])
def test_random_workload_with_aborts_leaks_nothing(prefix):
    rng = random.Random(1234 + prefix)
    h = Harness(num_blocks=20, block_size=4, budget=40, max_num_seqs=6, max_model_len=64,
                prefix=prefix, policy="cache_aware" if prefix else "fcfs")
    stems = [prompt_of(rng.randrange(4, 20), 100 + i) for i in range(12)]
    expected: dict[str, list[int]] = {}
    aborted: set[str] = set()
    submitted = 0
    while submitted < 1000 or h.sched.has_unfinished:
        for _ in range(rng.randrange(0, 4)):
            if submitted >= 1000:
                break
            prompt = rng.choice(stems)[:rng.randrange(1, 20)] + \
                [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 12))]
            prompt = prompt or [1]
            max_tokens = rng.randrange(1, 10)
            if rng.random() < 0.1:
                reqs = h.add_n(prompt, rng.randrange(2, 4), max_tokens=max_tokens)
            else:
                reqs = [h.add(prompt, max_tokens=max_tokens)]
            for r in reqs:
                expected[r.request_id] = expected_output(prompt, max_tokens)
            submitted += 1
        live = list(h.sched.running) + list(h.sched.waiting)
        if live and rng.random() < 0.1:
            victim = rng.choice(live)
            h.sched.finish(victim, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim.request_id)
            h.kv.check_integrity()
        if h.sched.has_unfinished:
            out = h.step()
            assert out or out.preempted, "no progress"
    assert len(h.finished) + len(aborted) == len(expected)
    for r in h.finished:
        assert r.output_token_ids == expected[r.request_id]
    assert len(h.preempted) > 10, "the workload was sized to cause preemptions"
    h.assert_all_free()
    if prefix:
        assert h.cache.hit_tokens > 0
        h.cache.reset()
        assert h.kv.pool.num_free == h.kv.num_blocks


@pytest.mark.parametrize("policy", ["fcfs", "cache_aware"])
def test_waiting_request_holding_cache_hits_cannot_stall_the_engine(policy):
    """A request that matched cached blocks but could not be admitted must not sit on them.

    A (16 tokens) finishes: its 4 blocks stay cached. R runs. W arrives with A's prompt as its
    prefix: it takes references on A's 4 cached blocks, cannot get 3 more, and waits. R then
    runs out of blocks and is preempted; if W still holds A's blocks, R can never be resumed
    and no step makes progress again.
    """
    h = Harness(num_blocks=8, block_size=4, budget=64, prefix=True, policy=policy)
    shared = prompt_of(16, 70)
    h.add(shared, max_tokens=1)
    h.run()
    r = h.add(prompt_of(8, 71), max_tokens=12)
    h.step()
    w = h.add(shared + prompt_of(12, 72), max_tokens=1)
    h.run(max_steps=200)
    assert r.output_token_ids == expected_output(r.prompt_token_ids, 12)
    assert w.output_token_ids == expected_output(w.prompt_token_ids, 1)
    h.assert_all_free()
