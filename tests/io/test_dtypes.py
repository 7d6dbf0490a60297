"""The one cast (io.dtypes.cast): round to nearest, ties to even, checked on bit patterns worked out by hand
(not by calling another cast), for every narrowing a conversion can do."""
import ml_dtypes
import numpy as np
import pytest

from llava_ckpt.io.dtypes import cast


def bits(a) -> list:
    return [int(x) for x in np.asarray(a).view(np.uint16).ravel()]


def test_float32_to_bfloat16_rounds_to_nearest_even():
    # float32 bit patterns; bfloat16 keeps the top 16 bits
    values = np.array([
        0x3F808000,  # 1 + 2^-8: exactly halfway between 0x3F80 and 0x3F81 -> the even one, 0x3F80
        0x3F818000,  # halfway between 0x3F81 and 0x3F82 -> the even one, 0x3F82
        0x3F808001,  # just above halfway -> up, 0x3F81
        0x3F807FFF,  # just below halfway -> down, 0x3F80 (truncation would agree here)
        0x3F80FFFF,  # far above halfway -> up, 0x3F81 (truncation would give 0x3F80)
        0xBF80C000,  # negative: -(1 + 2^-7 + 2^-8), above halfway in magnitude -> 0xBF81
    ], dtype=np.uint32).view(np.float32)
    assert bits(cast(values, "BF16")) == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x3F81, 0xBF81]


def test_float32_to_float16_rounds_to_nearest_even():
    values = np.array([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, 1 + 2**-11 - 2**-20, 2.0**-25 * 3],
                      dtype=np.float32)
    # 1.0 = 0x3C00, one float16 ulp at 1 is 2^-10; 3 * 2^-25 is 1.5 of the smallest subnormal (2^-24) -> 2
    assert bits(cast(values, "F16")) == [0x3C00, 0x3C02, 0x3C01, 0x3C00, 0x0002]


def test_float16_and_bfloat16_between_each_other():
    half = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-10], dtype=np.float16)
    assert bits(cast(half, "BF16")) == [0x3F80, 0x3F82, 0x3F81]  # ties to even, from the float16 value itself
    bf = np.array([0x3F81, 0x4780], dtype=np.uint16).view(ml_dtypes.bfloat16)  # 1 + 2^-7, 65536
    assert bits(cast(bf, "F16")) == [0x3C08, 0x7C00]  # exact; past float16's range -> inf


@pytest.mark.parametrize("code,dtype", [("F32", np.float32), ("F16", np.float16), ("BF16", ml_dtypes.bfloat16)])
def test_widening_is_exact_and_same_dtype_is_the_array_itself(code, dtype):
    x = np.array([0.1, -3.75, 1e-3], dtype=np.float16)
    wide = cast(x, "F32")
    assert wide.dtype == np.float32 and np.array_equal(wide, x.astype(np.float64))
    same = np.zeros(3, dtype=dtype)
    assert cast(same, code) is same
