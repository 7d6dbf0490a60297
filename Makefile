# The two commands of the README. Both create .venv on first use (scripts/setup).
.PHONY: demo test setup bench

setup:
	bash scripts/setup

demo: setup
	.venv/bin/llava-ckpt demo demo-output

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/convert.py --preset 7b-few-layers
