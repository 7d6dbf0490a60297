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


def itemsize(code: str) -> int:
    return DTYPES[code][0].itemsize
