"""load_weights(stored=True), generate's layout: the big matrices are the checkpoint file's own pages (no copy,
no float32 zeros filled first), in the stored 16-bit dtype; every other parameter is cast to the compute dtype."""
import subprocess
import sys

import numpy as np

from llava_ckpt.io.checkpoint import open_checkpoint
from llava_ckpt.model import build_and_load
from llava_ckpt.model.layers import stored_dtype_params
from maps import is_file_page, mapped_file

CLI = [sys.executable, "-m", "llava_ckpt.cli"]


def test_stored_matrices_are_the_files_pages(tiny, tmp_path):
    out = tmp_path / "out"
    subprocess.run(CLI + ["convert", tiny, str(out)], check=True, capture_output=True)
    checkpoint = open_checkpoint(str(out), "what convert wrote", "")
    from llava_ckpt.engine.config import load_config
    tensors = checkpoint.arrays()
    try:
        model, dtypes = build_and_load(load_config(str(out)), tensors, stored=True)
        keep = stored_dtype_params(model)
        params = {p.name: p for p in model.get_parameters()}
        assert len(keep) > 10
        for name in keep:
            p = params[name]
            assert str(p.dtype) == "Float16", name
            assert is_file_page(p.data_ptr(), out / "llava.safetensors"), (name, mapped_file(p.data_ptr()))
        others = [n for n in params if n not in keep]
        assert others and all(str(params[n].dtype) == "Float32" for n in others)
        name = sorted(keep)[0]
        np.testing.assert_array_equal(params[name].asnumpy(), np.asarray(tensors[name]))
    finally:
        tensors.close()
