"""The three dtypes a LLaVA checkpoint holds, by their names in safetensors, MindSpore and numpy."""
import ml_dtypes
import numpy as np

from ..errors import fail

# safetensors code -> (numpy dtype, MindSpore .ckpt tensor_type, user-facing name)
DTYPES = {
    "F16": (np.dtype(np.float16), "Float16", "float16"),
    "BF16": (np.dtype(ml_dtypes.bfloat16), "BFloat16", "bfloat16"),
    "F32": (np.dtype(np.float32), "Float32", "float32"),
}
BY_NAME = {v[2]: k for k, v in DTYPES.items()}
BY_MS = {v[1]: k for k, v in DTYPES.items()}

# Types a training checkpoint also holds (step counters, loss-scale flags, float64 scalars): the readers can index
# them (read_index(..., other_dtypes=True)) so they can be recognised and skipped; they are never converted.
# safetensors code -> (item size, MindSpore .ckpt tensor_type)
OTHER_DTYPES = {"F64": (8, "Float64"), "I64": (8, "Int64"), "U64": (8, "UInt64"), "I32": (4, "Int32"),
                "U32": (4, "UInt32"), "I16": (2, "Int16"), "U16": (2, "UInt16"), "I8": (1, "Int8"),
                "U8": (1, "UInt8"), "BOOL": (1, "Bool")}
OTHER_BY_MS = {v[1]: k for k, v in OTHER_DTYPES.items()}


def numpy_dtype(code: str) -> np.dtype:
    return DTYPES[code][0]


def ms_type(code: str) -> str:
    return DTYPES[code][1]


def dtype_name(code: str) -> str:
    return DTYPES[code][2]


def code_for(name: str) -> str:
    """'float16' | 'bfloat16' | 'float32' -> safetensors code."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise fail(f"unsupported dtype {name!r} (use float16, bfloat16 or float32)") from None


def casts_lose(chain) -> bool:
    """Whether values held in dtype chain[0] (names), cast through each dtype of `chain` in turn, can come out
    changed. Widening to float32 keeps every value (and a later cast back to the dtype the values came from
    gives them back); any other cast to a 16-bit dtype the values were not already rounded to (float32 ->
    16 bits, float16 <-> bfloat16) rounds or overflows."""
    held = {chain[0]}
    for b in chain[1:]:
        if b != "float32" and b not in held:
            return True
        held.add(b)
    return False


def itemsize(code: str) -> int:
    return DTYPES[code][0].itemsize if code in DTYPES else OTHER_DTYPES[code][0]


def cast(values: np.ndarray, code: str) -> np.ndarray:
    """`values` in the dtype of safetensors code `code`: the one cast convert, shard and export apply to tensor
    data, and the one the weight proof (verify) expects to find in a converted file.

    Narrowing rounds to the nearest representable value, ties to even (IEEE 754's default rounding: numpy's
    float32 -> float16, ml_dtypes' casts to and from bfloat16); widening is exact. Values past the target's range
    become inf, as in every IEEE cast. Returns `values` itself when it already has that dtype."""
    target = numpy_dtype(code)
    return values if values.dtype == target else values.astype(target)
