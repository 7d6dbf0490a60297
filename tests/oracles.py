"""The split rules spelled out a second time, independently of llava_ckpt.engine.splits, for tests to hold the
package to: rank r of N holds the r-th of N equal contiguous blocks along dim 0 (column, vocab) or dim 1 (row,
2-D weights; a 1-D row bias stays whole); a replicated tensor is whole on every rank. Never imported by the
package."""
import numpy as np

DIM = {"column": 0, "vocab": 0, "row": 1}


def rank_slice(shape, kind, tp, rank) -> tuple:
    """Index tuple of rank `rank`'s block of a whole tensor of `shape`."""
    index = [slice(None)] * len(shape)
    dim = DIM.get(kind)
    if dim is not None and dim < len(shape):
        assert shape[dim] % tp == 0, (shape, kind, tp)
        step = shape[dim] // tp
        index[dim] = slice(rank * step, (rank + 1) * step)
    return tuple(index)


def rank_piece(array, kind, tp, rank) -> np.ndarray:
    """Rank `rank`'s block of `array`, as a contiguous copy (what a rank file holds)."""
    return np.ascontiguousarray(array[rank_slice(array.shape, kind, tp, rank)])
