# The two commands of the README. Both create .venv on first use (scripts/setup); test also .venv-mindformers
# (scripts/setup-mindformers: MindFormers' own loader, run on our outputs by tests/io/test_mindformers.py).
.PHONY: demo test setup setup-mindformers bench

setup:
	bash scripts/setup

setup-mindformers:
	bash scripts/setup-mindformers

demo: setup
	.venv/bin/llava-ckpt demo demo-output

# Two workers (pytest-xdist), one test file each at a time: a file's module fixtures are made once, and the
# suite's subprocess starts and imports, single-threaded, overlap (10 min -> 5 on 2 cores, measured).
test: setup setup-mindformers
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

bench: setup
	.venv/bin/python benchmarks/convert.py --preset 7b-few-layers
