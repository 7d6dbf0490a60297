"""Damage a written weights file the way a bad conversion or a bad disk would: tensor bytes changed in place, the
file's layout and size as its manifest records them (re-saving a file would change its size, which every
command refuses before it reads the file)."""
import numpy as np

from llava_ckpt.io.readers import FileReader, read_index


def edit_tensors(path: str, edit) -> None:
    """Apply `edit(tensors)` (a dict name -> array, changed in place or replaced by arrays of the same shape and
    dtype) to the weights file at `path` (.safetensors or .ckpt), writing only the changed tensors' bytes."""
    infos = read_index(str(path))
    with FileReader() as reader:
        before = {name: reader.read(info) for name, info in infos.items()}
    tensors = {name: a.copy() for name, a in before.items()}
    edit(tensors)
    with open(path, "r+b") as f:
        for name, info in infos.items():
            new = np.ascontiguousarray(tensors[name])
            assert new.shape == before[name].shape and new.dtype == before[name].dtype, name
            if np.array_equal(new.view(np.uint8), before[name].view(np.uint8)):
                continue
            data, pos = new.reshape(-1).view(np.uint8).tobytes(), 0
            for offset, length in info.pieces:
                f.seek(offset)
                f.write(data[pos:pos + length])
                pos += length


def swap(tensors: dict, a: str, b: str) -> None:
    tensors[a], tensors[b] = tensors[b], tensors[a]
