"""Shared fixtures: tiny synthetic checkpoints, made once per session."""
import json
import os

import pytest

from llava_ckpt.fixture import make_fixture

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "llava_ckpt", "assets", "llava-1.5-7b-hf")


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
