"""The page allocator alone: allocation, reference counts, prefix hashes, LRU eviction."""

from __future__ import annotations

from jaxllm.engine.kv_pages import PagePool, page_hashes


def test_allocate_and_free_return_pages():
    pool = PagePool(4, 8)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1 and pool.num_used == 3
    assert pool.allocate(2) is None and pool.num_free == 1  # all or nothing
    pool.free(a)
    assert pool.num_free == 4 and pool.num_used == 0


def test_pages_for_counts_a_full_last_page_exactly():
    pool = PagePool(4, 8)
    assert [pool.pages_for(n) for n in (0, 1, 8, 9, 16, 17)] == [0, 1, 1, 2, 2, 3]


def test_hashes_chain_over_full_pages_only():
    h = page_hashes(list(range(20)), 8)
    assert len(h) == 2
    assert page_hashes(list(range(16)), 8) == h
    assert page_hashes(list(range(20)), 8, known=h[:1]) == h
    # Same second page, different first page: different hash for the second page.
    other = page_hashes([99] + list(range(1, 16)), 8)
    assert other[1] != h[1]


def test_match_prefix_shares_registered_pages_with_reference_counts():
    pool = PagePool(8, 4)
    tokens = list(range(12))
    pages = pool.allocate(3)
    pool.register(pages, page_hashes(tokens, 4))
    hit = pool.match_prefix(page_hashes(tokens[:8] + [77, 78, 79, 80], 4), max_pages=3)
    assert hit == pages[:2]
    assert [pool.refs[p] for p in pages] == [2, 2, 1]
    pool.free(pages)
    assert pool.num_used == 2  # still held by the second sequence
    pool.free(hit)
    assert pool.num_used == 0 and pool.num_cached == 3  # free, and still findable
    again = pool.match_prefix(page_hashes(tokens, 4), max_pages=2)
    assert again == pages[:2] and pool.num_used == 2  # max_pages bounds the hit


def test_no_prefix_caching_finds_nothing():
    pool = PagePool(8, 4, prefix_caching=False)
    pages = pool.allocate(2)
    pool.register(pages, page_hashes(list(range(8)), 4))
    assert pool.match_prefix(page_hashes(list(range(8)), 4), 2) == []


def test_eviction_takes_uncached_pages_first_then_least_recently_freed():
    pool = PagePool(4, 2)
    a, b = pool.allocate(2), pool.allocate(2)
    pool.register(a, page_hashes([1, 2, 3, 4], 2))
    pool.register(b, page_hashes([5, 6, 7, 8], 2))
    pool.free(a)  # freed first: evicted first; within a sequence its tail goes first
    pool.free(b)
    assert pool.num_cached == 4 and pool.num_free == 4
    got = pool.allocate(1)
    assert got == [a[1]]
    assert pool.match_prefix(page_hashes([1, 2, 3, 4], 2), 2) == [a[0]]  # a's head survived
    assert pool.match_prefix(page_hashes([5, 6, 7, 8], 2), 2) == b
    assert pool.num_cached == 3


def test_a_hash_already_cached_is_not_registered_twice():
    pool = PagePool(4, 2)
    a, b = pool.allocate(1), pool.allocate(1)
    h = page_hashes([1, 2], 2)
    pool.register(a, h)
    pool.register(b, h)
    pool.free(b)
    assert pool.num_cached == 1 and pool.match_prefix(h, 1) == a


def test_forget_cached_makes_every_page_plain_free():
    pool = PagePool(4, 2)
    a = pool.allocate(2)
    pool.register(a, page_hashes([1, 2, 3, 4], 2))
    held = pool.match_prefix(page_hashes([1, 2], 2), 1)
    pool.free(a)
    pool.forget_cached()
    assert pool.num_cached == 0 and pool.match_prefix(page_hashes([1, 2, 3, 4], 2), 2) == []
    pool.free(held)
    assert pool.num_free == 4 and len(set(pool.allocate(4))) == 4
