"""Model references resolve to files; broken inputs raise typed one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jaxllm.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from jaxllm.loading.load import load_model
from jaxllm.loading.resolve import resolve_model


def test_alias_and_default_find_the_packaged_gguf():
    for ref in (None, "smollm2", "SmolLM2"):
        files = resolve_model(ref)
        assert files.kind == "gguf" and files.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and files.path.exists()


def test_missing_paths_raise_model_not_found(tmp_path):
    for ref in (tmp_path / "nope.gguf", "./nope", "not-a-hub-id-or-path"):
        with pytest.raises(ModelNotFoundError):
            resolve_model(ref)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFoundError):
        resolve_model(tmp_path)  # a folder with no config.json


def test_corrupt_gguf_raises_model_load_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError):
        load_model(bad, progress=False)


def test_truncated_gguf_raises_model_load_error(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(2_000_000))
    with pytest.raises(ModelLoadError):
        load_model(cut, progress=False)


@pytest.fixture
def tiny_copy(tiny_models, tmp_path):
    folder, _ = tiny_models["llama"]
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.slow
def test_hub_id_loads_from_the_offline_cache(tiny_copy, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_copy, snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    files = resolve_model("acme/tiny")
    assert files.kind == "hf" and files.path == snap
    assert load_model("acme/tiny", progress=False).config.num_layers == 2
    with pytest.raises(ModelNotFoundError):
        resolve_model("acme/absent")


@pytest.mark.slow
def test_sharded_safetensors_with_index_load_the_same(tiny_copy, tmp_path):
    from safetensors.numpy import load_file, save_file

    whole = load_model(tiny_copy, progress=False).params
    tensors = load_file(str(tiny_copy / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tiny_copy / fname))
    (tiny_copy / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = load_model(tiny_copy, progress=False).params
    import jax

    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tiny_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError):
        load_model(tiny_copy, progress=False)


@pytest.mark.slow
def test_unsupported_architecture_and_bad_config(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError):
        load_model(tiny_copy, progress=False)
    (tiny_copy / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(ModelLoadError):
        load_model(tiny_copy, progress=False)
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_model(tiny_copy, progress=False)
    (tiny_copy / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2}}))
    with pytest.raises(UnsupportedModelError):
        load_model(tiny_copy, progress=False)
    (tiny_copy / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(ModelLoadError):
        load_model(tiny_copy, progress=False)


@pytest.mark.slow
def test_generation_config_eos_list_is_used(tiny_copy):
    (tiny_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    cfg = load_model(tiny_copy, progress=False).config
    assert set(cfg.eos_token_ids) == {2, 7}


@pytest.mark.slow
def test_every_eos_id_stops_generation(tiny_copy):
    from jaxllm import LLM, SamplingParams

    llm = LLM(str(tiny_copy), max_model_len=64, progress=False)
    free = llm.generate([1, 17, 42], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    second = free[0].outputs[0].token_ids[1]
    (tiny_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, second]}))
    llm = LLM(str(tiny_copy), max_model_len=64, progress=False)
    out = llm.generate([1, 17, 42], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == second and len(out.token_ids) <= 2
