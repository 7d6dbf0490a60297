"""llava-ckpt: Hugging Face LLaVA-1.5 -> MindSpore / MindFormers, streamed, sharded and verified.

The API is lazy so `import llava_ckpt` stays fast (MindSpore and torch load only when needed).
"""
__version__ = "0.1.0"

__all__ = ["convert", "export", "shard", "verify", "download", "make_fixture", "check", "load_tensors",
           "generate"]


def __getattr__(name):
    import importlib
    homes = {"convert": "convert", "export": "export", "shard": "shard", "verify": "verify", "download": "hub",
             "make_fixture": "fixture", "check": "check", "load_tensors": "io", "generate": "generate"}
    if name in homes:
        value = getattr(importlib.import_module(f".{homes[name]}", __name__), name)
        # importing the submodule bound its name here to the module (convert, shard, export share their
        # module's name): bind the function instead, so the next llava_ckpt.export(...) is the function too
        globals()[name] = value
        return value
    raise AttributeError(name)
