"""PKD-skip, PKD-last and given layer maps."""
import pytest

from pkd_cache.errors import PkdCacheError
from pkd_cache.student.layer_map import layer_map


def test_paper_maps_for_12_to_6():
    assert layer_map(12, 6, "skip") == [2, 4, 6, 8, 10]
    assert layer_map(12, 6, "last") == [7, 8, 9, 10, 11]


@pytest.mark.parametrize("n,k,skip,last", [
    (12, 3, [4, 8], [10, 11]),
    (6, 3, [2, 4], [4, 5]),
    (24, 6, [4, 8, 12, 16, 20], [19, 20, 21, 22, 23]),
    (12, 4, [3, 6, 9], [9, 10, 11]),
    (6, 1, [], []),
    (6, 6, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
])
def test_maps_for_other_depths(n, k, skip, last):
    assert layer_map(n, k, "skip") == skip
    assert layer_map(n, k, "last") == last


def test_maps_are_increasing_and_below_the_top_layer():
    for n in range(1, 25):
        for k in range(1, n + 1):
            for strategy in ("skip", "last"):
                m = layer_map(n, k, strategy)
                assert len(m) == k - 1
                assert all(1 <= x < n for x in m)
                assert m == sorted(set(m))


def test_given_map_is_checked():
    assert layer_map(6, 3, given=[1, 5]) == [1, 5]
    with pytest.raises(PkdCacheError, match="needs 2 teacher layers"):
        layer_map(6, 3, given=[1, 2, 3])
    with pytest.raises(PkdCacheError, match="out of range"):
        layer_map(6, 3, given=[0, 7])


def test_student_deeper_than_teacher_is_refused():
    with pytest.raises(PkdCacheError, match="deeper"):
        layer_map(6, 7)


def test_unknown_strategy():
    with pytest.raises(PkdCacheError, match="strategy"):
        layer_map(12, 6, "middle")
