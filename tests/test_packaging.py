"""The built wheel works on its own: tables and assets travel inside it, nothing reads the source tree."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (--no-deps) into a folder of its own."""
    base = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(base / "dist"), REPO], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (base / "dist").glob("llava_ckpt-*.whl")
    target = base / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    return target


def run_installed(target, cwd, *code_lines):
    # the wheel's folder first on the path; the venv's site-packages supplies the dependencies
    env = dict(os.environ, PYTHONPATH=str(target))
    return subprocess.run([sys.executable, "-c", "\n".join(code_lines)], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_wheel_carries_tables_and_assets(installed):
    tables = installed / "llava_ckpt" / "mappings"
    assert (tables / "llava-1.5.toml").is_file() and not tables.is_symlink()
    assets = installed / "llava_ckpt" / "assets"
    for name in ("default_image.png", "llava-1.5-7b-hf/config.json", "llava-1.5-7b-hf/tokenizer.model",
                 "llava-1.5-7b-hf/model.safetensors.index.json"):
        assert (assets / name).is_file(), name
    kernels = ("small_matmul.cc", "bf16_matmul.cc", "fused_ops.cc", "aot_matmul.h", "threads.h")  # built on first use
    for name in kernels:
        assert (installed / "llava_ckpt" / "model" / "kernels" / name).is_file(), name


def test_wheel_converts_from_a_folder_outside_the_checkout(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = run_installed(installed, work,
                         "import llava_ckpt, os, json",
                         f"assert llava_ckpt.__file__.startswith({str(installed)!r}), llava_ckpt.__file__",
                         "from llava_ckpt.fixture import make_fixture",
                         "src = make_fixture('hf', preset='tiny')",
                         "r = llava_ckpt.convert(src, 'out', tp=2, fuse_qkv=True, progress=False)",
                         "m = json.load(open('out/manifest.json'))",
                         "print(m['mapping']['file'], r['tp'], sorted(os.listdir('out'))[:3])")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[:2] == ["llava-1.5.toml", "2"]
    assert (work / "out" / "rank_1" / "llava.safetensors").is_file()  # the default format
