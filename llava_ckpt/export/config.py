"""Config in and out: which config.json (and tokenizer / processor files) the exported folder gets, and that
config.json with its dtype fields set to what was written."""
from __future__ import annotations

import json
import os

from ..engine.config import MAX_CONFIG
from ..errors import fail
from ..io.files import read_json
from ..io.hf_folder import side_files
from ..io.checkpoint import Checkpoint


def choose_config(source: Checkpoint, config: str | None) -> tuple:
    """(raw config.json, where it came from, side files [(name, real path)], the names whose record to check).
    `--config` (an HF folder, whose side files are copied, or a config.json) overrides what MS_SRC carries."""
    side = dict(source.side)
    from_source = set(side)
    if config:
        if os.path.isdir(config):
            given = side_files(config)
            if "config.json" not in dict(given):
                raise fail(f"--config {config}: no config.json in that folder")
            side.update(given)
            from_source -= set(dict(given))
        elif os.path.lexists(config):
            if not os.path.isfile(config):
                raise fail(f"--config {config} is not a regular file")
            side["config.json"] = os.path.realpath(config)
            from_source.discard("config.json")
        else:
            raise fail(f"--config {config} does not exist")
    if "config.json" not in side:
        raise fail(f"{source.path} carries no config.json: pass --config (a Hugging Face folder or a config.json)")
    where = config if config and os.path.isfile(config) else (
        os.path.join(config, "config.json") if config else os.path.join(source.path, "config.json"))
    raw = read_json(side["config.json"], where, MAX_CONFIG)
    if not isinstance(raw, dict):
        raise fail(f"{where} is not a JSON object")
    return raw, where, list(side.items()), from_source


def retyped_config(raw: dict, out_dtype: str | None) -> bytes | None:
    """config.json with its dtype fields (torch_dtype / dtype, top level and text_config) set to the exported
    dtype, so that from_pretrained's dtype="auto" loads what was written; None when they already say it."""
    if out_dtype is None:
        return None
    raw = json.loads(json.dumps(raw))
    changed = False
    for d in (raw, raw.get("text_config") if isinstance(raw.get("text_config"), dict) else None):
        if d is None:
            continue
        for key in ("torch_dtype", "dtype"):
            if key in d and d[key] != out_dtype:
                d[key] = out_dtype
                changed = True
    return (json.dumps(raw, indent=2) + "\n").encode("utf-8") if changed else None


def check_agrees(table: dict, cfg: dict, where: str, source: Checkpoint) -> None:
    """A --config must describe the model MS_SRC holds: every size the table names (heads, KV heads, layers,
    widths, ...) as MS_SRC's own config.json says, when it carries one. Same shapes with other head counts
    would export scrambled q/k/v rows with exit 0, so a disagreement is an error naming the key and both
    values."""
    from ..engine.config import normalize_config
    from ..engine.mapping import sizes
    own = dict(source.side).get("config.json")
    if own is None:
        return
    own_where = os.path.join(source.path, "config.json")
    theirs = sizes(table, normalize_config(read_json(own, own_where, MAX_CONFIG), own_where, table), own_where)
    given = sizes(table, cfg, where)
    for name, expr in table["sizes"].items():
        if given.get(name) != theirs.get(name):
            raise fail(f"{where} contradicts MS_SRC's own config ({own_where}): {expr} ({name}) is "
                       f"{given.get(name)} there, {theirs.get(name)} in {own_where}")
