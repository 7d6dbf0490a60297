"""The package's shape: no import cycles (counting imports inside functions too), and each concept defined once."""
import ast
import os
import re

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llava_ckpt")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict:
    """module -> the llava_ckpt modules it imports anywhere in its body."""
    graph = {}
    for root, _, files in os.walk(PKG):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            mod = _module_name(path)
            package = mod if name == "__init__.py" else mod.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")
                        base = base[:len(base) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target.startswith("llava_ckpt"):
                        deps.add(target)
                        deps.update(f"{target}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("llava_ckpt"))
            graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = import_graph()
    state: dict = {}
    cycles = []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if d.startswith(m + "."):   # a package importing its own submodules is not a cycle
                continue
            if state.get(d) == "open" and not m.startswith(d + "."):
                cycles.append(path[path.index(d):] + [d] if d in path else path + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


# Each concept and the one module it lives in: defining any of these names at the top level of another module is a
# second copy that can drift from the first.
HOMES = {
    "llava_ckpt.engine.splits": ["SPLIT_DIMS", "SPLIT_KINDS", "split_dim", "rank_shape", "merge",
                                 "tensor_map", "rank_blocks", "rank_boxes", "check_divides", "valid_degrees"],
    "llava_ckpt.engine.ops": ["OPS", "row_map", "forward", "inverse"],
    "llava_ckpt.io.paths": ["inside", "within", "is_plain_name"],
    "llava_ckpt.io.ranks": ["rank_folders", "rank_folder_name", "weights_name", "weight_paths", "output_weight_files",
                            "rank_weight_file", "RankedTensor", "boxed_tensor", "ranked_tensor"],
    "llava_ckpt.io.checkpoint": ["open_checkpoint", "Checkpoint", "is_training_state", "find_strategies",
                                 "OPTIMIZER_PREFIXES", "TRAINING_SCALARS"],
    "llava_ckpt.io.strategy": ["read_strategy", "read_stage_layouts", "write_strategy"],
    "llava_ckpt.io.output": ["staged_output", "staging_dir", "publish_dir", "check_free_space"],
    "llava_ckpt.io.files": ["sha256_file", "write_atomic", "write_json", "read_json", "fsync_dir"],
    "llava_ckpt.io.dtypes": ["cast"],
    "llava_ckpt.io.verification": ["write_record", "read_record", "output_files"],
    "llava_ckpt.io.writers": ["ckpt_load_warning", "host_memory"],
    "llava_ckpt.io.manifest": ["read_manifest", "write_manifest", "output_layout", "output_ranks", "recorded_side_files",
                               "FORMATS", "DEFAULT_FORMAT"],
    "llava_ckpt.verify.proof": ["plan_proof", "prove"],
    "llava_ckpt.engine.config": ["context_limit", "normalize_config", "DEFAULTS", "model_title", "image_token_count"],
    "llava_ckpt.model.anyres": ["is_anyres", "best_resolution", "grid_shape", "patch_count", "pack_index",
                                "token_count", "tower_inputs", "image_index", "batch_index", "stack_images"],
    "llava_ckpt.verify.hf_side": ["TEXT_CLASSES", "text_classes"],
    "llava_ckpt.io.mindformers": ["PREDICT_YAML", "STRATEGY_FOLDER", "predict_config", "predict_files"],
    "llava_ckpt.verify.record": ["start_hashing", "write_verification"],
    "llava_ckpt.verify.drift": ["rerun", "SHRINK"],
    "llava_ckpt.verify.streamed": ["module_names", "HEAD"],
    "llava_ckpt.prompts": ["FALLBACK_TEMPLATE", "load_image", "load_processor", "format_prompt", "encode",
                           "special_ids"],
    "llava_ckpt.runtime.msrun": ["run_jobs", "kill_run", "rank_threads"],
    "llava_ckpt.model.kernels": ["cpu_flags", "prefill_matmul", "prefill_matmul_op", "bf16_matmul_status",
                                 "small_matmul_status", "small_matmul_op", "check_prefill_mode",
                                 "round_to_bfloat16", "fused_ops", "fused_ops_status", "FusedOps"],
    "llava_ckpt.model.llama": ["head_columns", "seen_bias", "attention_bias", "causal_bias"],
    "llava_ckpt.model.layers": ["stored_dtype_params", "stored_dtype_owners"],
}


def _modules():
    for root, _, files in os.walk(PKG):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield _module_name(path), ast.parse(open(path, encoding="utf-8").read())


def _top_level_names(tree) -> set:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def test_each_concept_is_defined_in_exactly_one_module():
    where: dict = {}
    for mod, tree in _modules():
        for name in _top_level_names(tree):
            where.setdefault(name, []).append(mod)
    wrong = {name: where.get(name, []) for home, names in HOMES.items() for name in names
             if where.get(name, []) != [home]}
    assert wrong == {}


def test_every_command_opens_a_checkpoint_through_the_one_opener():
    """shard, export, verify and generate open a MindSpore checkpoint with io.checkpoint.open_checkpoint; nothing
    else lists an output's weight files (checked_weight_files) or joins rank pieces itself."""
    users = {"llava_ckpt.shard", "llava_ckpt.export", "llava_ckpt.verify.converted", "llava_ckpt.generate",
             "llava_ckpt.verify.proof"}
    calls: dict = {}
    for mod, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name in ("open_checkpoint", "checked_weight_files", "ranked_tensor", "boxed_tensor"):
                    calls.setdefault(name, set()).add(mod)
    assert users <= calls["open_checkpoint"]
    assert calls["checked_weight_files"] == {"llava_ckpt.io.checkpoint"}
    assert calls["ranked_tensor"] | calls["boxed_tensor"] <= {"llava_ckpt.io.checkpoint", "llava_ckpt.io.ranks"}


def _strings(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node, node.value


def test_no_second_containment_check_rank_scan_or_split_table():
    """What a copy of a concept looks like under another name: a path comparison outside io/paths.py, a rank
    folder pattern (a regex, or a name formatted from a rank number) outside io/ranks.py, a table of split
    kinds (a dict keyed by two or more of them) outside engine/splits.py."""
    kinds = {"column", "row", "vocab", "replicated"}
    offenders = []
    for mod, tree in _modules():
        for node in ast.walk(tree):
            if mod != "llava_ckpt.io.paths" and isinstance(node, ast.Attribute) and node.attr == "commonpath":
                offenders.append((mod, "commonpath"))
            if mod != "llava_ckpt.io.ranks" and isinstance(node, ast.JoinedStr):
                parts = node.values
                for a, b in zip(parts, parts[1:]):
                    if (isinstance(a, ast.Constant) and re.search(r"(^|[^A-Za-z0-9_])rank_$", str(a.value))
                            and isinstance(b, ast.FormattedValue)):
                        offenders.append((mod, "f'rank_{...}'"))
            if mod != "llava_ckpt.engine.splits" and isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if len(keys & kinds) >= 2:
                    offenders.append((mod, f"split kinds table {sorted(keys & kinds)}"))
        if mod != "llava_ckpt.io.ranks":
            for node, text in _strings(tree):
                if "rank_" in text and any(p in text for p in ("\\d", "[0-9]", "rank_(")):
                    offenders.append((mod, text))
    assert offenders == []


def test_the_parallel_cells_name_no_tensor():
    """model/parallel.py takes which cells are column / row / vocab from the split kinds: it names none of the
    table's tensors (a hand-written list of row-parallel cells would be a second copy of the table)."""
    import tomllib
    with open(os.path.join(os.path.dirname(PKG), "mappings", "llava-1.5.toml"), "rb") as f:
        table = tomllib.load(f)
    cells = {part for e in table["tensor"] for part in e["ms"].split(".")[:-1] if not part.startswith("{")}
    cells -= {"language_model", "model", "vision_encoder", "layers", "transformer", "resblocks"}
    tree = dict(_modules())["llava_ckpt.model.parallel"]
    named = sorted({text for _, text in _strings(tree) if text in cells})
    assert named == []
    assert {"wo", "w2", "adapter_2", "lm_head", "tok_embeddings"} <= cells  # the check can see what it looks for


# Which parts may import which: the runtime knows no job (it imports neither verify nor generate), and the
# engine, file formats, model and runtime import none of the commands.
COMMANDS = ("llava_ckpt.convert", "llava_ckpt.shard", "llava_ckpt.check", "llava_ckpt.generate", "llava_ckpt.demo",
            "llava_ckpt.cli", "llava_ckpt.fixture", "llava_ckpt.export", "llava_ckpt.verify")


def test_layers_import_downwards_only():
    graph = import_graph()
    bad = []
    for mod, deps in graph.items():
        if mod.startswith(("llava_ckpt.engine", "llava_ckpt.io", "llava_ckpt.model", "llava_ckpt.runtime",
                           "llava_ckpt.hub")):
            bad += [(mod, d) for d in deps if d.startswith(COMMANDS)]
    assert bad == []
