# The two commands of the README. Both create .venv on first use (scripts/setup); test also .venv-mindformers
# (scripts/setup-mindformers: MindFormers' own loader, run on our outputs by tests/io/test_mindformers.py).
.PHONY: demo test setup setup-mindformers bench

setup:
	bash scripts/setup

setup-mindformers:
	bash scripts/setup-mindformers

demo: setup
	.venv/bin/llava-ckpt demo demo-output

test: setup setup-mindformers
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/convert.py --preset 7b-few-layers
