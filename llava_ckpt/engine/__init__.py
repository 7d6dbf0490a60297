"""The conversion engine: what a mapping table says and how tensors follow it, both ways.

  mapping.py  reads a table (mappings/*.toml): chooses it from config.json, evaluates its sizes and layer sets,
              plans every target (Target)
  ops.py      the typed mapping kinds: each op one row map, read forward by convert and backward by export
  splits.py   the split rules: split kinds, their dims, rank shapes, merging, strategy tensor maps, valid degrees
  config.py   config.json with transformers' class defaults filled in
  records.py  the manifest's tensor records (how each tensor was made and split)
  forward.py  the way forward: planned targets streamed into rank files (convert, shard)
  inverse.py  the way back: HF tensors streamed out of MindSpore tensors (export)
"""
