"""The page allocator of the paged KV cache, with prefix caching. Host side, no JAX.

The device holds one pool of `num_pages` pages of `page_size` tokens per layer; this allocator
decides which page holds what. A page in use has a reference count (several sequences may share a
cached prefix page). A full page whose tokens are known gets a hash of its tokens and of everything
before it (the hash of the previous page), so a later prompt with the same prefix finds it. Pages
nobody uses go back to the free list; those with a hash stay findable until they are reused, the
least recently freed first.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence as Seq

import numpy as np


def page_hashes(tokens: Seq[int], page_size: int, known: list[bytes] | None = None, salt: bytes = b"") -> list[bytes]:
    """Chained digests of the full pages of `tokens`; `known` (a prefix of the result) is extended, not redone.

    A page's digest covers its tokens and the digest of the page before it (so, everything before it); the
    first page's covers `salt`, which tells apart pages that the same tokens give different keys and values
    (under a LoRA adapter).
    BLAKE2b, not Python's `hash`: a crafted colliding prompt must not read another request's pages.
    """
    out = list(known or [])
    ids = np.asarray(tokens[len(out) * page_size : len(tokens) // page_size * page_size], np.int64)
    for page in ids.reshape(-1, page_size):
        prev = out[-1] if out else salt
        out.append(hashlib.blake2b(prev + page.tobytes(), digest_size=16).digest())
    return out


class PagePool:
    """Allocates pages, shares cached prefix pages through reference counts, evicts LRU cached pages."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.refs = [0] * num_pages
        self._hash_of: list[bytes | None] = [None] * num_pages
        self._by_hash: dict[bytes, int] = {}
        self._free = collections.deque(range(num_pages))  # no hash: taken first
        self._cached_free: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU order
        self.hits = self.queries = 0  # prefix-cache pages found / looked for

    @property
    def num_free(self) -> int:
        """Pages that can be handed out now (unused, cached or not)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages findable by prefix hash (in use or free)."""
        return len(self._by_hash)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def cached_prefix(self, hashes: list[bytes], max_pages: int) -> int:
        """How many leading pages of `hashes` (at most max_pages) are cached; takes nothing."""
        if not self.prefix_caching:
            return 0
        n = 0
        while n < min(len(hashes), max_pages) and hashes[n] in self._by_hash:
            n += 1
        return n

    def match_prefix(self, hashes: list[bytes], max_pages: int) -> list[int]:
        """Take a reference on the cached pages of the longest prefix among `hashes` (at most max_pages)."""
        if not self.prefix_caching:
            return []
        pages = []
        for h in hashes[:max_pages]:
            page = self._by_hash.get(h)
            if page is None:
                break
            pages.append(page)
        for page in pages:
            self._take(page)
        return pages

    def record_lookup(self, pages: int, hits: int) -> None:
        """Count a prompt's prefix lookup (pages looked for, pages found) for the hit-rate metrics."""
        self.queries += pages
        self.hits += hits

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages, evicting least recently freed cached pages if needed; None when fewer are free."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._cached_free.popitem(last=False)
                del self._by_hash[self._hash_of[page]]
                self._hash_of[page] = None
            self.refs[page] = 1
            out.append(page)
        return out

    def register(self, pages: list[int], hashes: list[bytes]) -> None:
        """Make full pages findable by their prefix hashes (pages[i] holds the tokens hashed by hashes[i])."""
        if not self.prefix_caching:
            return
        for page, h in zip(pages, hashes, strict=False):
            if self._hash_of[page] is None and h not in self._by_hash:
                self._hash_of[page] = h
                self._by_hash[h] = page

    def free(self, pages: list[int]) -> None:
        """Drop one reference on each page; unused pages return to the free lists (last page first, so
        that a sequence's tail is evicted before its shared head)."""
        for page in reversed(pages):
            self.refs[page] -= 1
            assert self.refs[page] >= 0, f"page {page} freed twice"
            if self.refs[page] == 0:
                if self._hash_of[page] is None:
                    self._free.append(page)
                else:
                    self._cached_free[page] = None

    def forget_cached(self) -> None:
        """Drop every prefix digest (after a failed step, when cached contents can no longer be trusted)."""
        self._by_hash.clear()
        self._hash_of = [None] * self.num_pages
        self._free.extend(self._cached_free)
        self._cached_free.clear()

    def _take(self, page: int) -> None:
        if self.refs[page] == 0:
            del self._cached_free[page]
        self.refs[page] += 1
