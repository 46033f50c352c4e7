"""Near-duplicate groups by perceptual-hash distance: exact against brute force, and fast. The
close pairs are found here (near_duplicates.close_pairs), the groups in SQL (validation.triage)."""

import itertools
import re

import numpy as np
import pandas as pd
import pytest

from imgpipe.core.params import params_from_dict
from imgpipe.data import near_duplicates, validation
from imgpipe.data.manifest import COLUMNS


def groups(hashes: np.ndarray, k: int, mirrors: np.ndarray | None = None) -> np.ndarray:
    """Each hash's group as validation.triage names it, as the position of the group's first
    member: the ids are in position order, so a group's smallest id is its first member's."""
    n = len(hashes)
    as_hex = [f"{int(v):016x}" for v in hashes]
    frame = pd.DataFrame({
        "id": [f"{i:040x}" for i in range(n)], "label": "a", "path": [f"a/{i}.png" for i in range(n)],
        "source_split": None, "format": "png", "width": 28, "height": 28, "channels": 1, "bit_depth": 8,
        "bytes": 300, "error": None, "sharpness": 500.0, "brightness": 100.0, "contrast": 50.0, "phash": as_hex,
        "phash_mirror": as_hex if mirrors is None else [f"{int(v):016x}" for v in mirrors],
    })[COLUMNS].astype({c: "Int64" for c in ("width", "height", "channels", "bit_depth", "bytes")})
    rules = params_from_dict({"validate": {"near_duplicate_distance": k, "min_images_per_class": 1}}).validate
    result = validation.triage(frame, rules)
    assert len(result.accepted) == n
    return np.array([int(g, 16) for g in result.accepted["group"]])


def hashes_with_near_copies(n: int, copies: int, max_flips: int, seed: int = 0) -> np.ndarray:
    """n random 64-bit hashes, plus `copies` of them with up to `max_flips` bits flipped."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    flips = np.zeros(copies, dtype=np.uint64)
    for _ in range(max_flips):
        flips |= np.uint64(1) << rng.integers(0, 64, copies).astype(np.uint64)
    return np.concatenate([base, base[rng.integers(0, n, copies)] ^ flips])


def brute_force_pairs(hashes: np.ndarray, k: int) -> set[tuple[int, int]]:
    return {(i, j) for i, j in itertools.combinations(range(len(hashes)), 2)
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= k}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8, 12, 16])
def test_close_pairs_are_exactly_the_brute_force_ones(k):
    hashes = np.unique(hashes_with_near_copies(600, 150, k, seed=k))
    found = {tuple(pair) for pair in near_duplicates.close_pairs(hashes, k).tolist()}
    assert found == brute_force_pairs(hashes, k) and len(found) >= 100


@pytest.mark.parametrize("n, k", [(10, 1), (1000, 4), (100_000, 4), (10**7, 4), (1000, 10)])
def test_masks_cover_every_pattern_of_k_differing_blocks(n, k):
    masks = near_duplicates.masks(n, k)
    assert len(masks) <= near_duplicates.MAX_MASKS
    # any k bits flipped leave at least one mask untouched: checked on random patterns
    rng = np.random.default_rng(n)
    for _ in range(2000):
        flipped = sum(1 << int(b) for b in rng.choice(64, size=k, replace=False))
        assert any(m & flipped == 0 for m in masks)


def test_groups_chain_and_are_numbered_by_first_member():
    a = 0x0123456789ABCDEF
    hashes = np.array([a ^ 0b1111, 0xFEDCBA9876543210, a ^ 0b11, a, a, 0xFFFF0000FFFF0000], dtype=np.uint64)
    # 0 ~ 2 (2 bits), 2 ~ 3 (2 bits), 3 = 4: one group although 0 and 3 are 4 bits apart
    assert groups(hashes, 2).tolist() == [0, 1, 0, 0, 0, 5]
    assert groups(hashes, 0).tolist() == [0, 1, 2, 3, 3, 5]


def test_hundred_thousand_hashes_each_copy_finds_its_original():
    # how the time grows with n is measured by bench/validate_bench.py (near-duplicate search)
    hashes = hashes_with_near_copies(90_000, 10_000, 4)
    found = groups(hashes, 4)
    assert len(np.unique(found)) == 90_000  # brute force would compare 5 * 10^9 pairs
    assert (found[90_000:] < 90_000).all()  # every copy is in the group of an original


def test_parse_reads_the_manifest_column():
    assert near_duplicates.parse(["ffffffffffffffff", "0000000000000001"]).tolist() == [2**64 - 1, 1]
    values = hashes_with_near_copies(1000, 0, 0)
    column = pd.Series([f"{int(v):016x}" for v in values])
    assert np.array_equal(near_duplicates.parse(column), values) and near_duplicates.parse([]).shape == (0,)


@pytest.mark.parametrize("bad", ["abc", "0" * 17, "000000000000000g", "0x00000000000000", "00 0000000000000", None])
def test_parse_names_a_value_that_is_not_a_hash(bad):
    with pytest.raises(ValueError, match=f"not a 64-bit hash in 16 hex digits: {re.escape(repr(bad))}"):
        near_duplicates.parse(["0123456789abcdef", bad] * 8)


def test_mirror_hashes_join_groups_as_brute_force_says():
    rng = np.random.default_rng(7)
    n, k = 300, 3
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    mirrors = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2)
    # flipped copies: image i + 200 is image i mirrored (hash and mirror hash swapped), a few bits off
    for i in range(40):
        hashes[200 + i] = mirrors[i] ^ np.uint64(1 << int(rng.integers(64)))
        mirrors[200 + i] = hashes[i]

    def close(a, b):
        return bin(int(a) ^ int(b)).count("1") <= k

    # brute force: i ~ j when any of i's two hashes is within k of any of j's
    parent = list(range(n))

    def root(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i, j in itertools.combinations(range(n), 2):
        if any(close(a, b) for a in (hashes[i], mirrors[i]) for b in (hashes[j], mirrors[j])):
            parent[max(root(i), root(j))] = min(root(i), root(j))
    expected = [min(x for x in range(n) if root(x) == root(i)) for i in range(n)]
    found = groups(hashes, k, mirrors=mirrors).tolist()
    assert found == expected
    assert sum(g != i for i, g in enumerate(found)) >= 40  # every flipped copy found its original
    # without the mirror hashes the flipped copies stay alone
    assert groups(hashes, k).tolist() == list(range(n))


def test_a_long_chain_is_one_group_whatever_the_order():
    # hash i differs from hash i + 1 in one bit, from hash j in |i - j| bits: one group at k = 1,
    # found in several rounds of passing the smallest value along (one round would split it)
    chain = np.array([0x0123456789ABCDEF ^ ((1 << i) - 1) for i in range(61)], dtype=np.uint64)
    order = np.random.default_rng(3).permutation(len(chain))
    assert groups(chain[order], 1).tolist() == [0] * len(chain)
    assert len(set(groups(chain[order], 0).tolist())) == len(chain)
