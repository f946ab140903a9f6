"""The simulated engine's KV blocks and prefix cache, in counts and block hashes.

A sequence's blocks are either *private* (only counted) or *shared*: prompt blocks registered in the prefix
cache under their chained hash, reference-counted, so that sequences with the same prompt prefix hold the same
physical blocks. A shared block nobody references any more stays cached, *evictable*, until its memory is
needed, least recently freed first. Like vLLM, evictable blocks count as free.
"""

from __future__ import annotations

from collections import OrderedDict


class KVCache:
    """The block pool of one engine; the scheduler keeps each sequence's own counts."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._private = 0
        self._refs: dict[int, int] = {}  # hash -> number of sequences holding the block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first

    @property
    def used_blocks(self) -> int:
        return self._private + len(self._refs)

    @property
    def free_blocks(self) -> int:
        """Blocks that can be allocated now: never used, or evictable."""
        return self.num_blocks - self._private - len(self._refs)

    @property
    def cached_blocks(self) -> int:
        """Blocks in the prefix cache, held or evictable."""
        return len(self._refs) + len(self._evictable)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> None:
        """Take ``count`` private blocks (at most ``free_blocks``), evicting cached ones when no other is left."""
        never_used = self.num_blocks - self._private - len(self._refs) - len(self._evictable)
        for _ in range(count - never_used):
            self._evictable.popitem(last=False)
        self._private += count

    def release(self, prefix: tuple[int, ...], shared: int, private: int) -> None:
        """Give back a sequence's blocks: ``private`` counted ones and its ``shared`` leading prompt blocks."""
        refs, evictable = self._refs, self._evictable
        # Tail blocks first, so that they are evicted before the head blocks other prompts are likelier to share.
        for block_hash in reversed(prefix[:shared]):
            count = refs[block_hash] - 1
            if count:
                refs[block_hash] = count
            else:
                del refs[block_hash]
                evictable[block_hash] = None
        self._private -= private

    def lookup(self, prefix: tuple[int, ...], max_blocks: int) -> tuple[int, int]:
        """How many leading blocks of ``prefix`` (at most ``max_blocks``) are cached, and how many are evictable.

        Holding an evictable block takes it out of the free ones, which the caller must count in.
        """
        if not self.prefix_caching:
            return 0, 0
        hits = from_evictable = 0
        for block_hash in prefix[:max_blocks]:
            if block_hash in self._evictable:
                from_evictable += 1
            elif block_hash not in self._refs:
                break
            hits += 1
        return hits, from_evictable

    def hold(self, prefix: tuple[int, ...], hits: int) -> None:
        """Reference the ``hits`` leading blocks ``lookup`` found."""
        refs = self._refs
        for block_hash in prefix[:hits]:
            if block_hash in refs:
                refs[block_hash] += 1
            else:
                del self._evictable[block_hash]
                refs[block_hash] = 1

    def register(self, prefix: tuple[int, ...], start: int, stop: int) -> None:
        """Blocks ``start`` to ``stop`` of a prompt were computed into private blocks: cache and share them.

        A block that another sequence computed meanwhile is adopted and the duplicate freed, which keeps every
        sequence's shared blocks a prefix of its prompt.
        """
        refs = self._refs
        for block_hash in prefix[start:stop]:
            count = refs.get(block_hash)
            if count is None:
                self._evictable.pop(block_hash, None)  # our fresh copy replaces a cached one nobody holds
                refs[block_hash] = 1
            else:
                refs[block_hash] = count + 1
        self._private -= stop - start
