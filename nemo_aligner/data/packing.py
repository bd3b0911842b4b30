"""Bin packing of sequence lengths into fixed-capacity packs, as pure functions.

This file owns the packing algorithms used to build packed datasets: which entries (sequences, or
chosen+rejected pairs) share a pack. It knows nothing of tokens or files; it maps a list of integer
lengths and a capacity to packs, each pack a list of entry indices into `lengths`.

Algorithms (names as NeMo-Aligner's `+packing_algorithm`, plus best fit):
  - first_fit_shuffle: entries in a seeded random order (`shuffled_order`), each into the first pack
    (lowest index, i.e. earliest opened) with room, else a new pack. NeMo shuffled without a seed;
    here the same seed always gives the same packs.
  - first_fit_decreasing: the same, entries by length descending (ties keep index order).
  - best_fit_decreasing: entries by length descending, each into the pack with the least remaining
    room that still fits (ties: lowest pack index), else a new pack.

Packs are returned in opening order; within a pack, entries in placement order.

Complexity: NeMo rescanned and re-summed every pack per entry (quadratic). Here first fit keeps a
max-segment-tree over packs (leftmost pack with room in O(log n)); best fit keeps one min-heap of pack
indices per remaining-room value plus a bitmask of non-empty values, so "smallest room >= size" is
one shift and one lowest-set-bit on a (capacity + 1)-bit integer (about capacity / 30 machine-word
steps inside CPython, ~140 for capacity 4096, so effectively constant). In length-descending
order, a run of equal lengths is placed a pack at a time (a pack absorbs as many as fit), and packs
opened for a run are opened in one batch, so work grows with packs touched rather than entries.
"""

from collections import defaultdict
from heapq import heappop, heappush
from typing import Callable, Sequence

import numpy as np

ALGORITHMS = ("first_fit_shuffle", "first_fit_decreasing", "best_fit_decreasing")


# ---------------------------------------------------------------------------------------------
# Input checks and entry orders
# ---------------------------------------------------------------------------------------------


def _validate(lengths: Sequence[int], capacity: int) -> tuple[np.ndarray, int]:
    """Return (lengths as an int64 array, capacity as a Python int) after checking both."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise ValueError(f"capacity must be an integer, got {capacity!r}")
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0, got {capacity}")
    capacity = int(capacity)  # numpy scalars would leak into the bitmask arithmetic
    arr = np.asarray(lengths)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), capacity
    if arr.ndim != 1:
        raise ValueError(f"lengths must be a flat sequence of integers, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    _raise_on_first(arr <= 0, arr, lambda i, n: f"entry {i} has length {n}; lengths must be >= 1")
    _raise_on_first(arr > capacity, arr, lambda i, n: f"entry {i} has length {n} > capacity {capacity}")
    return arr, capacity


def _raise_on_first(bad: np.ndarray, arr: np.ndarray, message: Callable[[int, int], str]) -> None:
    """Raise ValueError naming the first flagged entry, and how many others share the fault."""
    bad_idx = np.flatnonzero(bad)
    if bad_idx.size:
        first = int(bad_idx[0])
        more = f" ({bad_idx.size - 1} more entries like it)" if bad_idx.size > 1 else ""
        raise ValueError(message(first, int(arr[first])) + more)


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """The entry order first_fit_shuffle uses: `numpy.random.default_rng(seed).permutation(n)`."""
    return np.random.default_rng(seed).permutation(n)


def decreasing_order(lengths: np.ndarray) -> np.ndarray:
    """Item indices by length descending; ties keep index order (a stable sort)."""
    # Sorting (max - length) ascending with a stable sort is "descending, ties by index";
    # uint16 keys let numpy use its radix sort, several times faster than mergesort on int64.
    keys = lengths.max() - lengths
    if keys.size and keys.max() < 2**16:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def _runs(sorted_lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """(length, count) of each run of equal lengths in an already sorted array."""
    starts = np.flatnonzero(np.diff(sorted_lengths, prepend=-1))
    counts = np.diff(starts, append=sorted_lengths.size)
    return sorted_lengths[starts].tolist(), counts.tolist()


# ---------------------------------------------------------------------------------------------
# First fit: max-segment-tree over packs
# ---------------------------------------------------------------------------------------------
# The tree is a flat list: node i has children 2i and 2i+1, leaves start at `size`, and leaf
# `size + b` holds pack b's remaining room (0 for packs not yet opened, which no entry can use since
# every length is >= 1). tree[1] is the largest room of any pack.


def _tree_size(max_packs: int) -> int:
    size = 1
    while size < max_packs:
        size *= 2
    return size


def _leftmost_fit(tree: list, size: int, length: int) -> int:
    """Leaf position of the lowest-index pack with room >= length; caller ensures tree[1] >= length."""
    i = 1
    while i < size:
        i <<= 1
        if tree[i] < length:
            i += 1
    return i


def _set_leaf(tree: list, i: int, room: int) -> None:
    tree[i] = room
    while i > 1:
        sibling = tree[i ^ 1]
        if sibling > room:
            room = sibling  # now the parent's maximum
        i >>= 1
        if tree[i] == room:  # ancestors already hold the right maximum
            break
        tree[i] = room


def _set_leaves(tree: list, size: int, first_pack: int, rooms: list) -> None:
    """Set consecutive leaves at once, then rebuild their ancestors level by level (C-speed slices)."""
    lo, hi = size + first_pack, size + first_pack + len(rooms) - 1
    tree[lo : hi + 1] = rooms
    while lo > 1:
        lo, hi = lo >> 1, hi >> 1
        tree[lo : hi + 1] = map(max, tree[2 * lo : 2 * hi + 2 : 2], tree[2 * lo + 1 : 2 * hi + 2 : 2])


def _first_fit_entries(lengths: list, capacity: int) -> list:
    """First fit in the given order, one entry at a time; returns the pack of each position.

    `_leftmost_fit` and `_set_leaf` are inlined: this loop runs once per entry and the two calls
    cost about a quarter of its time.
    """
    size = _tree_size(len(lengths))
    tree = [0] * (2 * size)
    pack_of_pos = [0] * len(lengths)
    num_packs = 0
    for pos, length in enumerate(lengths):
        if tree[1] < length:  # no pack fits: open one
            i = size + num_packs
            num_packs += 1
            room = capacity - length
        else:
            i = 1
            while i < size:
                i <<= 1
                if tree[i] < length:
                    i += 1
            room = tree[i] - length
        pack_of_pos[pos] = i - size
        tree[i] = room
        while i > 1:
            sibling = tree[i ^ 1]
            if sibling > room:
                room = sibling
            i >>= 1
            if tree[i] == room:
                break
            tree[i] = room
    return pack_of_pos


def _new_packs_for_run(length: int, count: int, capacity: int) -> tuple[list, list]:
    """Entries per new pack, and each new pack's room left, when `count` entries of `length` open packs.

    No existing pack fits, so the run fills fresh packs in turn: each takes capacity // length entries
    (a pack keeps fitting the run until its room drops below `length`), the last takes the rest.
    """
    per_pack = capacity // length
    num_full, rest = divmod(count, per_pack)
    counts = [per_pack] * num_full + ([rest] if rest else [])
    return counts, [capacity - c * length for c in counts]


def _first_fit_runs(run_lengths: list, run_counts: list, capacity: int) -> tuple[list, list]:
    """First fit over runs of equal lengths; returns (pack, number of entries) per placement chunk.

    Within a run, entry-by-entry first fit fills the leftmost fitting pack until its room drops below
    the length, then moves right, so one tree search per pack touched suffices.
    """
    size = _tree_size(sum(run_counts))  # never more packs than entries
    tree = [0] * (2 * size)
    chunk_packs, chunk_counts = [], []
    num_packs = 0
    for length, count in zip(run_lengths, run_counts):
        while count and tree[1] >= length:
            leaf = _leftmost_fit(tree, size, length)
            room = tree[leaf]
            placed = min(room // length, count)
            _set_leaf(tree, leaf, room - placed * length)
            chunk_packs.append(leaf - size)
            chunk_counts.append(placed)
            count -= placed
        if count:
            counts, rooms = _new_packs_for_run(length, count, capacity)
            _set_leaves(tree, size, num_packs, rooms)
            chunk_packs.extend(range(num_packs, num_packs + len(counts)))
            chunk_counts.extend(counts)
            num_packs += len(counts)
    return chunk_packs, chunk_counts


# ---------------------------------------------------------------------------------------------
# Best fit: per-room min-heaps of pack indices + bitmask of non-empty rooms
# ---------------------------------------------------------------------------------------------


def _best_fit_runs(run_lengths: list, run_counts: list, capacity: int) -> tuple[list, list]:
    """Best fit over runs of equal lengths; returns (pack, number of entries) per placement chunk.

    After an entry goes into the tightest pack (room r), that pack's new room r - length is strictly
    the tightest that still fits if it fits at all (no pack had room in [length, r)), so the run
    keeps filling it: one lookup per pack touched.
    """
    heaps = defaultdict(list)  # heaps[r]: packs with room exactly r, lowest index on top
    nonempty = 0  # bit r set <=> heaps[r] is non-empty
    min_length = run_lengths[-1]  # runs are descending: rooms below this can never be used again
    chunk_packs, chunk_counts = [], []
    num_packs = 0
    for length, count in zip(run_lengths, run_counts):
        while count:
            above = nonempty >> length
            if not above:
                break
            room = length + (above & -above).bit_length() - 1  # smallest non-empty room >= length
            heap = heaps[room]
            b = heappop(heap)
            if not heap:
                nonempty ^= 1 << room
            placed = min(room // length, count)
            count -= placed
            room -= placed * length
            if room >= min_length:
                heappush(heaps[room], b)
                nonempty |= 1 << room
            chunk_packs.append(b)
            chunk_counts.append(placed)
        if count:
            counts, rooms = _new_packs_for_run(length, count, capacity)
            for b, room in enumerate(rooms, start=num_packs):
                if room >= min_length:
                    # New packs outrank every index already in the heap, so push is an append.
                    heaps[room].append(b)
                    nonempty |= 1 << room
            chunk_packs.extend(range(num_packs, num_packs + len(counts)))
            chunk_counts.extend(counts)
            num_packs += len(counts)
    return chunk_packs, chunk_counts


# ---------------------------------------------------------------------------------------------
# Public algorithms
# ---------------------------------------------------------------------------------------------


def _group_into_packs(order: np.ndarray, pack_of_pos: np.ndarray) -> list[list[int]]:
    """Turn 'position p of `order` went to pack pack_of_pos[p]' into packs of entry indices.

    Positions were placed in increasing order, so a stable sort by pack keeps placement order.
    """
    if order.size == 0:
        return []
    by_pack = np.argsort(pack_of_pos, kind="stable")
    entries = order[by_pack].tolist()
    ends = np.cumsum(np.bincount(pack_of_pos)).tolist()
    return [entries[start:end] for start, end in zip([0] + ends[:-1], ends)]


def _pack_decreasing(lengths: Sequence[int], capacity: int, place_runs: Callable) -> list[list[int]]:
    arr, capacity = _validate(lengths, capacity)
    if arr.size == 0:
        return []
    order = decreasing_order(arr)
    run_lengths, run_counts = _runs(arr[order])
    chunk_packs, chunk_counts = place_runs(run_lengths, run_counts, capacity)
    return _group_into_packs(order, np.repeat(chunk_packs, chunk_counts))


def first_fit_shuffle(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """First fit with entries in `shuffled_order(len(lengths), seed)`."""
    arr, capacity = _validate(lengths, capacity)
    if arr.size == 0:
        return []
    order = shuffled_order(arr.size, seed)
    pack_of_pos = _first_fit_entries(arr[order].tolist(), capacity)
    return _group_into_packs(order, np.asarray(pack_of_pos))


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First fit with entries by length descending (ties in index order)."""
    return _pack_decreasing(lengths, capacity, _first_fit_runs)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best fit (tightest pack that fits, ties to the lowest pack index), entries by length descending."""
    return _pack_decreasing(lengths, capacity, _best_fit_runs)


_ALGORITHM_FNS: dict[str, Callable[[Sequence[int], int, int], list[list[int]]]] = {
    "first_fit_shuffle": first_fit_shuffle,
    "first_fit_decreasing": lambda lengths, capacity, seed: first_fit_decreasing(lengths, capacity),
    "best_fit_decreasing": lambda lengths, capacity, seed: best_fit_decreasing(lengths, capacity),
}
assert tuple(_ALGORITHM_FNS) == ALGORITHMS


def pack(
    lengths: Sequence[int], capacity: int, algorithm: str = "best_fit_decreasing", seed: int = 0
) -> list[list[int]]:
    """Pack entries of the given lengths into packs of `capacity`; each pack is a list of entry indices.

    `seed` only affects first_fit_shuffle. Raises ValueError for capacity <= 0, a length < 1 or
    > capacity (naming the entry), or an unknown algorithm.
    """
    if algorithm not in _ALGORITHM_FNS:
        raise ValueError(f"unknown packing algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    return _ALGORITHM_FNS[algorithm](lengths, capacity, seed)


def packing_stats(lengths: Sequence[int], packs: Sequence[Sequence[int]], capacity: int) -> dict:
    """Summary of a packing: pack count against the ceil(total / capacity) lower bound, fill rate."""
    arr = np.asarray(lengths, dtype=np.int64)
    total = int(arr.sum())
    num_packs = len(packs)
    num_entries = sum(len(b) for b in packs)
    lower_bound = -(-total // capacity)  # exact ceil; float division can round for huge totals
    return {
        "num_packs": num_packs,
        "num_entries": num_entries,
        "efficiency": total / (num_packs * capacity) if num_packs else 0.0,
        "min_packs": lower_bound,
        "packs_over_min": num_packs / lower_bound - 1 if lower_bound else 0.0,
        "avg_entries_per_pack": num_entries / num_packs if num_packs else 0.0,
    }
