"""Bin-packing algorithms: invariants, determinism, exact agreement with brute-force references, errors."""

import numpy as np
import pytest

from nemo_aligner.data.packing import (
    ALGORITHMS,
    best_fit_decreasing,
    first_fit_decreasing,
    first_fit_shuffle,
    pack,
    packing_stats,
    shuffled_order,
)

# ---------------------------------------------------------------------------------------------
# Brute-force references: scan every bin per item, obviously correct, O(n * bins).
# ---------------------------------------------------------------------------------------------


def brute_first_fit(lengths, order, capacity):
    bins, rooms = [], []
    for i in order:
        for b, room in enumerate(rooms):
            if room >= lengths[i]:
                bins[b].append(i)
                rooms[b] -= lengths[i]
                break
        else:
            bins.append([i])
            rooms.append(capacity - lengths[i])
    return bins


def brute_best_fit(lengths, order, capacity):
    bins, rooms = [], []
    for i in order:
        fitting = [(room, b) for b, room in enumerate(rooms) if room >= lengths[i]]
        if fitting:
            _, b = min(fitting)  # least room, then lowest bin index
            bins[b].append(i)
            rooms[b] -= lengths[i]
        else:
            bins.append([i])
            rooms.append(capacity - lengths[i])
    return bins


def descending(lengths):
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])  # Python's sort is stable


def random_case(rng):
    """Small cases; some with few distinct lengths so that runs of equal lengths are common."""
    capacity = int(rng.integers(1, 41))
    n = int(rng.integers(1, 61))
    high = int(rng.integers(1, capacity + 1))
    if rng.random() < 0.5:
        lengths = rng.integers(1, high + 1, n)
    else:
        lengths = rng.choice(rng.integers(1, high + 1, 3), n)
    return lengths.tolist(), capacity


def check_valid(lengths, bins, capacity):
    assert all(bins), "empty bin"
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))


def lognormal_lengths(n, capacity, seed):
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(capacity / 7), 1.0, n)), 1, capacity).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Invariants and determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 17, 500, 20_000])
def test_every_item_once_and_no_bin_over_capacity(algorithm, seed, n):
    lengths = lognormal_lengths(n, 512, seed)
    bins = pack(lengths, 512, algorithm, seed=seed)
    check_valid(lengths.tolist(), bins, 512)
    assert bins == pack(lengths.tolist(), 512, algorithm, seed=seed)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "lengths, capacity, expected_num_packs",
    [
        ([5], 8, 1),
        ([8], 8, 1),
        ([3] * 10, 9, 4),  # three per bin
        ([4] * 10, 9, 5),  # equal lengths, not dividing capacity
        ([8] * 7, 8, 7),  # every item exactly the capacity
        ([1] * 100, 1, 100),
        ([1] * 100, 100, 1),
    ],
)
def test_edge_cases(algorithm, lengths, capacity, expected_num_packs):
    bins = pack(lengths, capacity, algorithm)
    check_valid(lengths, bins, capacity)
    assert len(bins) == expected_num_packs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_empty_input_gives_no_bins(algorithm):
    assert pack([], 16, algorithm) == []


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_accepts_numpy_and_list_inputs_alike(algorithm):
    lengths = lognormal_lengths(300, 128, 3)
    expected = pack(lengths.tolist(), 128, algorithm, seed=5)
    assert pack(lengths.astype(np.int32), np.int64(128), algorithm, seed=5) == expected


def test_shuffle_seed_changes_result():
    lengths = lognormal_lengths(200, 256, 0)
    results = [first_fit_shuffle(lengths, 256, seed) for seed in range(5)]
    assert all(r == first_fit_shuffle(lengths, 256, s) for s, r in enumerate(results))
    assert len({str(r) for r in results}) == 5


def test_decreasing_algorithms_ignore_seed():
    lengths = lognormal_lengths(200, 256, 0)
    for algorithm in ("first_fit_decreasing", "best_fit_decreasing"):
        assert pack(lengths, 256, algorithm, seed=0) == pack(lengths, 256, algorithm, seed=123)


def test_shuffled_order_is_the_documented_permutation():
    assert shuffled_order(50, 7).tolist() == np.random.default_rng(7).permutation(50).tolist()


# ---------------------------------------------------------------------------------------------
# Exact agreement with the brute-force references
# ---------------------------------------------------------------------------------------------


def test_first_fit_decreasing_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(400):
        lengths, capacity = random_case(rng)
        expected = brute_first_fit(lengths, descending(lengths), capacity)
        assert first_fit_decreasing(lengths, capacity) == expected, (lengths, capacity)


def test_best_fit_decreasing_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(400):
        lengths, capacity = random_case(rng)
        expected = brute_best_fit(lengths, descending(lengths), capacity)
        assert best_fit_decreasing(lengths, capacity) == expected, (lengths, capacity)


def test_first_fit_shuffle_matches_brute_force_on_shuffled_order():
    rng = np.random.default_rng(2)
    for seed in range(400):
        lengths, capacity = random_case(rng)
        expected = brute_first_fit(lengths, shuffled_order(len(lengths), seed).tolist(), capacity)
        assert first_fit_shuffle(lengths, capacity, seed) == expected, (lengths, capacity, seed)


LARGER_CASES = {
    "lognormal": lognormal_lengths(1500, 100, 4).tolist(),
    "uniform": np.random.default_rng(0).integers(1, 101, 3000).tolist(),  # where FFD and BFD differ
}


@pytest.mark.parametrize("case", LARGER_CASES)
@pytest.mark.parametrize(
    "algorithm, reference",
    [("first_fit_decreasing", brute_first_fit), ("best_fit_decreasing", brute_best_fit)],
)
def test_decreasing_matches_brute_force_on_larger_cases(algorithm, reference, case):
    # Deeper trees, long runs of equal lengths, batches of new bins.
    lengths = LARGER_CASES[case]
    assert pack(lengths, 100, algorithm) == reference(lengths, descending(lengths), 100)


def test_uniform_larger_case_separates_first_fit_from_best_fit():
    lengths = LARGER_CASES["uniform"]
    order = descending(lengths)
    assert brute_first_fit(lengths, order, 100) != brute_best_fit(lengths, order, 100)


def test_first_fit_shuffle_matches_brute_force_on_a_larger_case():
    lengths = lognormal_lengths(1500, 100, 5).tolist()
    expected = brute_first_fit(lengths, shuffled_order(1500, 9).tolist(), 100)
    assert first_fit_shuffle(lengths, 100, 9) == expected


def test_best_fit_picks_the_tightest_bin_where_first_fit_picks_the_first():
    # 7 opens bin 0 (room 3); the 4s share bin 1 (room 2). The 2 fits both.
    lengths = [7, 4, 4, 2]
    assert first_fit_decreasing(lengths, 10) == [[0, 3], [1, 2]]
    assert best_fit_decreasing(lengths, 10) == [[0], [1, 2, 3]]


def test_best_fit_breaks_ties_by_lowest_bin_index():
    # Bins 0 and 1 both end with room 2 after the 8s; the 2s go to bin 0 first.
    assert best_fit_decreasing([8, 8, 2, 2], 10) == [[0, 2], [1, 3]]


# ---------------------------------------------------------------------------------------------
# Errors and stats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -4])
def test_rejects_non_positive_capacity(capacity):
    with pytest.raises(ValueError, match=f"capacity must be > 0, got {capacity}"):
        pack([1, 2], capacity)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rejects_item_over_capacity_naming_it(algorithm):
    lengths = [10] * 17 + [5000, 20]
    with pytest.raises(ValueError, match=r"entry 17 has length 5000 > capacity 4096"):
        pack(lengths, 4096, algorithm)


@pytest.mark.parametrize("bad", [0, -3])
def test_rejects_non_positive_length_naming_it(bad):
    with pytest.raises(ValueError, match=rf"entry 2 has length {bad}; lengths must be >= 1"):
        pack([4, 5, bad, 6], 16)


def test_rejects_non_integer_lengths():
    with pytest.raises(ValueError, match="lengths must be integers"):
        pack([1.5, 2.0], 16)


def test_rejects_unknown_algorithm_listing_valid_names():
    with pytest.raises(ValueError, match="unknown packing algorithm 'next_fit'; valid: first_fit_shuffle, "):
        pack([1, 2], 16, "next_fit")


def test_packing_stats():
    lengths = [6, 6, 4, 3]  # total 19
    stats = packing_stats(lengths, [[0, 2], [1, 3]], 10)
    assert stats["num_packs"] == 2
    assert stats["num_entries"] == 4
    assert stats["efficiency"] == pytest.approx(19 / 20)
    assert stats["min_packs"] == 2
    assert stats["packs_over_min"] == pytest.approx(0.0)
    assert stats["avg_entries_per_pack"] == pytest.approx(2.0)
    assert packing_stats([5, 5, 5], [[0], [1], [2]], 10)["packs_over_min"] == pytest.approx(0.5)
