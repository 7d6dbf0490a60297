"""Shared fixtures: tiny synthetic checkpoints, made once per session."""
import json

import pytest

from llava_ckpt.fixture import make_fixture


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """make(dtype="float16", layout="hub") -> path of a tiny HF checkpoint, cached per (dtype, layout)."""
    made = {}

    def make(dtype="float16", layout="hub", **kw):
        key = (dtype, layout, json.dumps(kw, sort_keys=True))
        if key not in made:
            out = tmp_path_factory.mktemp("tiny") / f"tiny-{dtype}-{layout}-{len(made)}"
            made[key] = str(make_fixture(str(out), preset="tiny", dtype=dtype, layout=layout, **kw))
        return made[key]
    return make


@pytest.fixture(scope="session")
def tiny(tiny_factory):
    return tiny_factory()
