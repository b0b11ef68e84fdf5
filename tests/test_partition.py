import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpriv.common.partition import PartitionError, by_column, dirichlet, iid, label_histogram


def covers_exactly(parts, n):
    joined = np.concatenate(parts)
    return len(joined) == n and len(np.unique(joined)) == n


@given(n=st.integers(10, 500), sites=st.integers(1, 10), seed=st.integers(0, 10_000))
@settings(max_examples=50, deadline=None)
def test_iid_is_a_balanced_partition(n, sites, seed):
    parts = iid(n, sites, seed)
    assert covers_exactly(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@given(sites=st.integers(2, 8), alpha=st.floats(0.3, 100), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_dirichlet_is_a_partition_with_min_rows(sites, alpha, seed):
    labels = np.repeat(np.arange(10), 60)
    parts = dirichlet(labels, sites, alpha, seed, min_rows=5)
    assert covers_exactly(parts, len(labels))
    assert min(len(p) for p in parts) >= 5


def skew(labels, parts, k):
    hist = label_histogram(labels, parts, k).astype(float)
    shares = hist / hist.sum(axis=1, keepdims=True)
    return float(np.abs(shares - 1 / k).sum(axis=1).mean())


def test_smaller_alpha_means_more_label_skew():
    labels = np.repeat(np.arange(20), 100)
    skews = [skew(labels, dirichlet(labels, 10, alpha, seed=0), 20) for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.3 and skews[2] > 1.0


def test_partitions_are_deterministic_per_seed():
    labels = np.repeat(np.arange(5), 40)
    a, b, c = (dirichlet(labels, 4, 0.5, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(iid(50, 3, 1), iid(50, 3, 1), strict=True))


def test_dirichlet_gives_up_with_a_clear_error():
    labels = np.repeat(np.arange(3), 5)
    with pytest.raises(PartitionError, match="simulation.alpha=0.01 with 10 sites"):
        dirichlet(labels, 10, 0.01, seed=0, min_rows=3)


def test_column_partition_is_one_site_per_value():
    values = ["north", "south", "north", "east", "south", "north"]
    parts, names = by_column(values, 3)
    assert names == ["east", "north", "south"]
    assert [p.tolist() for p in parts] == [[3], [0, 2, 5], [1, 4]]
    with pytest.raises(PartitionError, match="3 distinct values but simulation.sites=2"):
        by_column(values, 2)
