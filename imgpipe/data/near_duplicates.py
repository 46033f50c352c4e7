"""Near-duplicate groups: images whose 64-bit perceptual hashes differ in at most k bits.

Comparing every pair is O(n^2): 5 * 10^11 pairs for a million images. Instead, multi-index
hashing finds the close pairs by exact lookups. Cut the 64 bits into m blocks. Two hashes at
distance <= k differ in at most k blocks, so they agree exactly on at least m - k of them, and
hence on every block of at least one (m - k)-subset of the blocks. For each subset (a bit mask),
sort the hashes by their masked bits: the candidates are the hashes that share those bits, and
only candidates are compared (one XOR and popcount each).

Cost: C(m, k) masks, each a sort, O(n log n); plus the candidates. With masks of b bits, a hash
shares its masked bits with about n / 2^b random others, so m is chosen to make 2^b >= n: the
candidates then grow like n, not n^2 (100k images: a few hundred thousand comparisons, not
5 * 10^9). Hashes of real photos are not uniform, so some keys are shared more: identical
hashes are merged first (they are near-duplicates by definition), and the candidates are
generated per key run, in O(candidates) memory.

A group is a connected component of the "close" relation (single linkage): if A is close to B
and B to C, all three are kept together, which is what keeps a split free of leakage. With each
image's mirror hash as well (imgpipe/images/facts.py), an image is also close to another whose
hash is close to its mirror hash: a copy flipped left to right joins the original's group. The
components are found in SQL, out of core (imgpipe/data/validation.py, `_group`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

HASH_BITS = 64
# at most this many masks (sorts): past it, fewer, shorter masks and more candidates are cheaper
MAX_MASKS = 256


def parse(hex_hashes) -> np.ndarray:
    """16-hex-digit hashes (the manifest's `phash` column) as uint64."""
    hashes = np.asarray(hex_hashes, dtype=object)  # a pandas column's own strings, not copies of them
    digits = HASH_BITS // 4
    try:
        # all at once, big-endian as written: 5x faster than int(h, 16) for each hash
        parsed = np.frombuffer(bytes.fromhex("".join(hashes)), dtype=">u8").astype(np.uint64)
        if len(parsed) == len(hashes) and not set(map(len, hashes)) - {digits}:
            return parsed
    except (TypeError, ValueError):  # not all strings, not all hex digits
        pass
    wrong = next(h for h in hashes if not isinstance(h, str) or len(h) != digits or not _HEX.issuperset(h))
    raise ValueError(f"not a {HASH_BITS}-bit hash in {digits} hex digits: {wrong!r}")


_HEX = frozenset("0123456789abcdefABCDEF")


def masks(n: int, k: int) -> list[int]:
    """Bit masks such that two hashes at distance <= k are equal under at least one of them."""
    if k == 0:
        return [(1 << HASH_BITS) - 1]
    wanted = math.log2(max(n, 2))
    blocks = k + 1
    # more blocks: longer masks (fewer random candidates) but more of them (more sorts)
    while (HASH_BITS * (blocks - k) // blocks < wanted and blocks < HASH_BITS
           and math.comb(blocks + 1, k) <= MAX_MASKS):
        blocks += 1
    edges = [round(i * HASH_BITS / blocks) for i in range(blocks + 1)]
    block_masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges, edges[1:])]
    return [sum(subset) for subset in itertools.combinations(block_masks, blocks - k)]


def close_pairs(hashes: np.ndarray, k: int) -> np.ndarray:
    """Index pairs (i < j) of distinct hashes at Hamming distance <= k; shape (pairs, 2)."""
    n = len(hashes)
    found = [np.empty((0, 2), dtype=np.int64)]
    if k == 0 or n < 2:
        return found[0]
    for mask in masks(n, k):
        keys = hashes & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        first, second = _pairs_within_runs(keys[order])
        i, j = order[first], order[second]
        close = np.bitwise_count(hashes[i] ^ hashes[j]) <= k
        found.append(np.sort(np.stack([i[close], j[close]], axis=1), axis=1))
    # a pair equal under several masks is found several times
    return np.unique(np.concatenate(found), axis=0)


def _pairs_within_runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All position pairs (p, q), p < q, inside each run of equal values of a sorted array."""
    n = len(sorted_keys)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], n]  # one past each run's last position
    run_end = np.repeat(ends, ends - starts)
    later = run_end - np.arange(n) - 1  # how many positions follow p in its run
    first = np.repeat(np.arange(n), later)
    # for each p, the offsets 1..later[p]: a running count restarted at each p
    offsets = np.arange(len(first)) - np.repeat(np.cumsum(later) - later, later) + 1
    return first, first + offsets
