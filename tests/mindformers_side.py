"""MindFormers' own loading code run on llava-ckpt outputs (run by tests/io/test_mindformers.py with the
.venv-mindformers interpreter: mindformers 1.6.0 on mindspore 2.7.2, which cannot share llava-ckpt's venv).

    python tests/mindformers_side.py WORK OUT [OUT ...]

For each OUT: MindFormers' config machinery reads OUT/predict_llava.yaml (MindFormerConfig); its qkv-concat check
(check_safetensors_key on LlamaForCausalLM's concat keys) looks at the weights; its safetensors loader finds the
checkpoint mode, and for rank folders merges the source strategy from the folder the yaml names
(get_merged_src_strategy_path), unifies the ranks (unify_safetensors, standalone) and loads the unified files
(load_safetensors_checkpoint) into a network holding a Parameter per tensor the manifest lists (LlavaVlm itself
lives in MindFormers' research/ folder, which its wheel does not carry). Prints one JSON object:
{OUT: {"config": {...}, "mode", "qkv_concat_in_weights", "params": {name: sha256 of the loaded bytes}}}.
"""
import glob
import hashlib
import json
import os
import sys

import numpy as np


def main(work, outs):
    import mindspore as ms
    from mindspore import nn
    from mindformers.models.llama.llama import LlamaForCausalLM
    from mindformers.tools.register import MindFormerConfig
    from mindformers.utils import load_checkpoint_utils as loader
    from mindformers.utils.safetensors.utils import check_safetensors_key
    # one process, nothing to wait for: MindFormers' barrier() is a collective op MindSpore has no CPU kernel of
    loader.barrier = lambda: None

    class Holder(nn.Cell):
        """A Parameter per tensor of the output (names as MindFormers' LlavaVlm names them)."""

        def __init__(self, entries):
            super().__init__(auto_prefix=False)
            dtypes = {"float16": np.float16, "float32": np.float32}
            self.names = []
            for i, e in enumerate(entries):
                p = ms.Parameter(ms.Tensor(np.zeros(e["shape"], dtypes[e["dtype"]])), name=e["name"])
                setattr(self, f"p{i}", p)
                self.names.append(e["name"])

        def convert_name(self, key):  # the names are MindFormers' already: nothing for its HF renaming to do
            return key

    report = {}
    for n, out in enumerate(outs):
        config = MindFormerConfig(os.path.join(out, "predict_llava.yaml"))
        config.output_dir = os.path.join(work, f"mf-output-{n}")
        model = config.model.model_config
        text, vision = model.text_config.model_config, model.vision_config.model_config
        entries = json.load(open(os.path.join(out, "manifest.json")))["tensors"]
        network = Holder(entries)
        mode = loader._get_checkpoint_mode(config)
        target = config.load_checkpoint if os.path.isfile(config.load_checkpoint) else os.path.join(
            config.load_checkpoint, "rank_0")
        concat = all(check_safetensors_key(target, key) for key in LlamaForCausalLM.obtain_qkv_ffn_concat_keys())
        if mode == loader.CheckpointFileMode.MULTI_CHECKPOINT_FILE_WITH_RANK_ID.value:
            src_strategy = loader.get_merged_src_strategy_path(config)
            folder, suffix = loader._get_src_file_suffix(config)
            unified = os.path.join(work, f"unified-{n}")
            loader.unify_safetensors(folder, src_strategy, unified, use_parallel=False, file_suffix=suffix)
            files = sorted(glob.glob(os.path.join(unified, f"*.{config.load_ckpt_format}")))
            load_dir = unified
        else:
            files, load_dir = [config.load_checkpoint], os.path.dirname(config.load_checkpoint)
        said = {"load_ckpt_format": config.load_ckpt_format, "use_parallel": config.use_parallel,
                "model_parallel": config.parallel_config.model_parallel, "qkv_concat": text.qkv_concat,
                "hidden_size": text.hidden_size, "num_layers": text.num_layers, "num_heads": text.num_heads,
                "vocab_size": text.vocab_size, "intermediate_size": text.intermediate_size,
                "vision_hidden_size": vision.hidden_size, "vision_layers": vision.num_hidden_layers,
                "num_queries": vision.num_queries, "param_init_type": model.param_init_type,
                "vocab_file": config.processor.tokenizer.vocab_file,
                "src_strategy_path_or_dir": config.src_strategy_path_or_dir}
        config.use_parallel = False  # standalone: the unified files load whole into one process
        loader.load_safetensors_checkpoint(config, files, network, None, load_dir, None)
        params = {p.name: hashlib.sha256(p.asnumpy().tobytes()).hexdigest() for p in network.get_parameters()}
        report[out] = {"mode": mode, "qkv_concat_in_weights": concat, "files": len(files), "params": params,
                       "config": said}
    print("MINDFORMERS-REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
