"""Reference MindSpore LLaVA (1.5, bakLlava, LLaVA-NeXT) with the converted (MindFormers LlavaVlm) parameter names.

It exists to run converted checkpoints: check them against transformers (`llava_ckpt.verify`) and answer
questions (`llava_ckpt.generate`); it is not a training model. Usage: `model, _ = build_and_load(cfg, tensors)`,
then `Runner(model).generate(...)` (one prompt, greedy) or `.generate_batch(...)` (left-padded batches, greedy
or `sampling.sampler(...)`).
"""
__all__ = ["LlavaVlm", "Runner", "trace_names", "build_and_load", "detect_fused", "ignored_names",
           "load_weights", "set_device"]
_HOMES = {"LlavaVlm": "llava", "Runner": "llava", "trace_names": "llava", "build_and_load": "loading",
          "detect_fused": "loading", "ignored_names": "loading", "load_weights": "loading", "set_device": "loading"}


def __getattr__(name):
    """Lazy, so that `llava_ckpt.model.sampling` or `.kernels` can be imported without MindSpore (generate checks
    its inputs before MindSpore starts)."""
    import importlib
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(name)
