"""Model files: safetensors + JSON round trips and clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch

from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import (
    ModelFileError,
    build_model,
    list_models,
    load_model,
    model_paths,
    read_record,
    resolve_model_path,
    save_model,
)


@pytest.fixture
def saved_tiny(tmp_path):
    torch.manual_seed(0)
    model = build_model(preset_config("mpt", "tiny", 1)).eval()
    path = save_model(model, tmp_path / "tiny-model", training={"steps": 3, "data": "unit test"})
    return model, path


@pytest.mark.parametrize("arch", ["mpt", "h2t_unet"])
def test_save_load_round_trip_is_bit_identical(tmp_path, arch):
    torch.manual_seed(0)
    model = build_model(preset_config(arch, "tiny", 1)).eval()
    path = save_model(model, tmp_path / f"{arch}.safetensors", description="round trip")
    loaded = load_model(path)
    x = torch.rand(1, 1, 77, 91)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.record.architecture == model.config
    assert loaded.record.description == "round trip"
    assert not loaded.model.training


def test_files_are_safetensors_and_json_only(saved_tiny):
    _, path = saved_tiny
    weights, record = model_paths(path)
    assert weights.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON
    meta = json.loads(record.read_text())
    assert meta["architecture"]["arch"] == "mpt"
    assert meta["architecture"]["preset"] == "tiny"
    assert meta["training"] == {"steps": 3, "data": "unit test"}
    assert len(meta["weights_sha256"]) == 64
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-model.json", "tiny-model.safetensors"]


def test_fp16_storage_loads_close_to_fp32(tmp_path):
    torch.manual_seed(0)
    model = build_model(preset_config("h2t_unet", "tiny", 1)).eval()
    full = save_model(model, tmp_path / "full")
    half = save_model(model, tmp_path / "half", dtype="float16")
    assert model_paths(half)[0].stat().st_size < 0.6 * model_paths(full)[0].stat().st_size
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        diff = (model(x) - load_model(half).model(x)).abs().max().item()
    assert 0 < diff < 1e-2


def test_truncated_weights_give_clear_error(saved_tiny):
    _, path = saved_tiny
    weights, _ = model_paths(path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="checksum does not match"):
        load_model(path)


def test_truncated_weights_without_checksum_give_clear_error(saved_tiny):
    _, path = saved_tiny
    weights, record = model_paths(path)
    meta = json.loads(record.read_text())
    meta["weights_sha256"] = ""
    record.write_text(json.dumps(meta))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(path)


def test_weights_of_another_architecture_give_clear_error(tmp_path, saved_tiny):
    _, path = saved_tiny
    _, record = model_paths(path)
    meta = json.loads(record.read_text())
    meta["architecture"] = preset_config("mpt", "small", 1).model_dump()
    meta["weights_sha256"] = ""
    record.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="do not match the architecture.*missing tensors.*shape mismatches"):
        load_model(path)


def test_invalid_record_names_the_field(saved_tiny):
    _, path = saved_tiny
    _, record = model_paths(path)
    meta = json.loads(record.read_text())
    meta["architecture"]["dim"] = "wide"
    record.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"invalid model record(.|\n)*dim"):
        read_record(path)
    record.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        read_record(path)


def test_newer_format_is_refused(saved_tiny):
    _, path = saved_tiny
    _, record = model_paths(path)
    meta = json.loads(record.read_text())
    meta["format_version"] = 99
    record.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="newer than this package"):
        read_record(path)


def test_unknown_model_lists_known_ones(tmp_path, monkeypatch, saved_tiny):
    _, path = saved_tiny
    monkeypatch.setenv("MPT_DEBLUR_MODELS_DIR", str(path.parent))
    assert resolve_model_path("tiny-model") == path
    assert ("tiny-model", path, "user") in list_models()
    with pytest.raises(ModelFileError, match="unknown model 'nope'.*known models:.*tiny-model"):
        load_model("nope")


def test_save_does_not_leave_temporary_files(saved_tiny):
    _, path = saved_tiny
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_save_refuses_models_without_config():
    with pytest.raises(TypeError, match="build_model"):
        save_model(torch.nn.Conv2d(1, 1, 3), "x")
