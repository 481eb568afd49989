"""Loading reads weights from safetensors only and never unpickles; bad folders get errors that name the file."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mmlens
from mmlens.errors import CheckpointError, PickleWeightsError


class Payload:
    """A planted pickle: unpickling it creates the folder `marker` (any code could run in its place)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def copy(tiny_folder, tmp_path):
    """copy(name) -> a private copy of the tiny model's folder, safe to damage."""
    return lambda name: shutil.copytree(tiny_folder(name), tmp_path / name)


@pytest.fixture
def torch_loads(monkeypatch):
    """The calls made to torch.load while the test runs; each one fails, so nothing is ever unpickled."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        raise RuntimeError("torch.load called: something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    return calls


def _to_pickle(folder, safe: str, pickled: str) -> None:
    """Replace the safetensors file `safe` by the same tensors saved with torch.save (pickle) as `pickled`."""
    torch.save(load_file(folder / safe), folder / pickled)
    (folder / safe).unlink()


# (model, safetensors file it ships, pickle file that replaces it, object whose save_pretrained converts it)
PICKLED = [
    ("clip", "model.safetensors", "pytorch_model.bin", "model"),
    ("clip", "model.safetensors", "weights.ckpt", "model"),
    ("sd", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin", "pipe"),
    ("sd", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "pipe"),
]


@pytest.mark.parametrize("name,safe,pickled,saver", PICKLED)
def test_pickle_only_weights_refused_without_unpickling(copy, torch_loads, name, safe, pickled, saver):
    folder = copy(name)
    _to_pickle(folder, safe, pickled)
    with pytest.raises(PickleWeightsError) as err:
        mmlens.load(folder)
    msg = str(err.value)
    assert str(folder / pickled) in msg and "safetensors only" in msg and f"{saver}.save_pretrained(folder)" in msg
    assert torch_loads == []


@pytest.mark.parametrize("name,safe,pickled,saver", PICKLED[:1] + PICKLED[2:3])
def test_planted_pickle_never_runs(copy, tmp_path, monkeypatch, name, safe, pickled, saver):
    folder, marker = copy(name), tmp_path / "pwned"
    torch.save(Payload(marker), folder / pickled)
    (folder / safe).unlink()
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load called"))
    with pytest.raises(PickleWeightsError, match=str(folder / pickled)):
        mmlens.load(folder)
    assert not marker.exists() and calls == []


def test_sharded_pickle_index_refused(copy, torch_loads):
    folder = copy("clip")
    tensors = load_file(folder / "model.safetensors")
    torch.save(tensors, folder / "pytorch_model-00001-of-00001.bin")
    index = {"metadata": {}, "weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in tensors}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    with pytest.raises(PickleWeightsError, match="pytorch_model-00001-of-00001.bin.*1 more pickle"):
        mmlens.load(folder)
    assert torch_loads == []


def test_sharded_safetensors_load_and_missing_shard_named(tiny_folder, tmp_path, torch_loads):
    from transformers import CLIPModel

    folder = tmp_path / "sharded"
    CLIPModel.from_pretrained(tiny_folder("clip")).save_pretrained(folder, max_shard_size="300KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    expected = load_file(tiny_folder("clip") / "model.safetensors")
    loaded = mmlens.load(folder).model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[-1]} is missing.*model.safetensors.index.json"):
        mmlens.load(folder)
    assert torch_loads == []


@pytest.mark.parametrize("name,safe,pickled,saver", PICKLED[:1] + PICKLED[2:3])
def test_use_safetensors_passed_to_from_pretrained(copy, torch_loads, name, safe, pickled, saver):
    """A stray .safetensors file next to pickle weights passes the folder check; from_pretrained must still refuse
    the pickle (use_safetensors=True) instead of falling back to it."""
    folder = copy(name)
    _to_pickle(folder, safe, pickled)
    from safetensors.torch import save_file

    save_file({"unrelated": torch.zeros(2)}, folder / os.path.dirname(safe) / "extra.safetensors")
    with pytest.raises(OSError, match=os.path.basename(safe)):
        mmlens.load(folder)
    assert torch_loads == []


@pytest.mark.parametrize("name", ["clip", "sd"])
def test_use_safetensors_false_refused(tiny_folder, torch_loads, name):
    with pytest.raises(ValueError, match=r"use_safetensors=False is not allowed: mmlens loads safetensors .* never "
                                         r"unpickles"):
        mmlens.load(tiny_folder(name), use_safetensors=False)
    assert mmlens.load(tiny_folder(name), use_safetensors=True).model is not None
    assert torch_loads == []


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"{err.msg} at line {err.lineno} column {err.colno}"
    raise AssertionError("text is valid JSON")


@pytest.mark.parametrize("file", ["config.json", "model_index.json"])
def test_invalid_json_named_with_position(tmp_path, file):
    bad = '{\n  "architectures": ["CLIPModel"],\n  "_class_name": "StableDiffusionPipeline",\n}\n'
    (tmp_path / file).write_text(bad)
    with pytest.raises(CheckpointError) as err:
        mmlens.load(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / file} is not valid JSON: {_json_error(bad)}")
    assert "line 4 column 1" in str(err.value)


def test_invalid_component_config_named(copy):
    folder = copy("sd")
    (folder / "unet" / "config.json").write_text('{"sample_size": 16,,}')
    with pytest.raises(CheckpointError, match=f"{folder / 'unet' / 'config.json'} is not valid JSON: .* line 1 "):
        mmlens.load(folder)


@pytest.mark.parametrize("index", [{"unet": ["diffusers", "UNet2DConditionModel"]}, {"_class_name": 3}, []])
def test_model_index_without_class_name(tmp_path, index):
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        mmlens.load(tmp_path)
    assert str(tmp_path / "model_index.json") in str(err.value)
    assert ("_class_name" if isinstance(index, dict) else "must hold a JSON object") in str(err.value)


@pytest.mark.parametrize("archs", ["CLIPModel", ["CLIPModel", 3], {"CLIPModel": 1}])
def test_architectures_must_be_list_of_names(tmp_path, archs):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": archs, "model_type": "clip"}))
    with pytest.raises(CheckpointError) as err:
        mmlens.load(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'config.json'}: 'architectures' must be a list of class names")
    assert repr(archs) in msg


def _damage(path, how: str) -> str:
    """Damage a safetensors file in place; returns the phrase the error must contain."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if how == "half":
        path.write_bytes(data[: len(data) // 2])
        return f"header describes {len(data)} bytes .* file holds {len(data) // 2}"
    if how == "padded":
        path.write_bytes(data + b"\0" * 16)
        return f"file holds {len(data) + 16}"
    if how == "absurd_length":
        path.write_bytes((2**62).to_bytes(8, "little") + data[8:])
        return f"header length is {2**62} bytes, but the file holds {len(data)}"
    if how == "header_not_json":
        path.write_bytes(data[:8] + b"x" + data[9:])
        return f"its {n}-byte header is not JSON"
    if how == "bad_offsets":
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [10, 5]
        raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(raw) == n
        path.write_bytes(data[:8] + raw + data[8 + n :])
        return f"tensor '{name}' has no valid data_offsets"
    assert how == "short"
    path.write_bytes(data[:5])
    return "holds 5 bytes, fewer than the 8-byte header length"


@pytest.mark.parametrize("how", ["half", "padded", "absurd_length", "header_not_json", "bad_offsets", "short"])
@pytest.mark.parametrize("name,safe", [("clip", "model.safetensors"),
                                       ("sd", "vae/diffusion_pytorch_model.safetensors")])
def test_corrupt_safetensors_named(copy, monkeypatch, name, safe, how):
    import diffusers
    import transformers

    folder = copy(name)
    phrase = _damage(folder / safe, how)
    reached = []  # neither library may see the damaged file
    for lib in (transformers.PreTrainedModel, diffusers.ModelMixin):
        monkeypatch.setattr(lib, "from_pretrained", classmethod(lambda cls, *a, **k: reached.append(cls)))
    with pytest.raises(CheckpointError) as err:
        mmlens.load(folder)
    msg = str(err.value)
    assert msg.startswith(f"{folder / safe} is not a valid safetensors file: ")
    assert re.search(phrase, msg), msg
    assert "truncated or corrupt" in msg and reached == []


def test_clip_loads_saved_weights_and_runs(tiny_folder, torch_loads):
    from mmlens.testing.tiny_models import sample_inputs

    lens = mmlens.load(tiny_folder("clip"))
    saved = load_file(tiny_folder("clip") / "model.safetensors")
    state = lens.model.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    with torch.no_grad():
        out = lens.model(**sample_inputs("clip", lens, batch=2))
    assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.logits_per_image).all()
    assert torch_loads == []


def test_sd_loads_saved_weights_and_runs(tiny_folder, torch_loads):
    folder = tiny_folder("sd")
    pipe = mmlens.load(folder).model
    for file in ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"]:
        state = getattr(pipe, file.split("/")[0]).state_dict()
        for key, value in load_file(folder / f"{file}.safetensors").items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    with torch.no_grad():
        noise = pipe.unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 5, 32)).sample
    assert noise.shape == (1, 4, 16, 16) and torch.isfinite(noise).all()
    assert torch_loads == []


@pytest.mark.parametrize("value", [torch.bfloat16, "bfloat16"])
@pytest.mark.parametrize("name, key", [("clip", "dtype"), ("clip", "torch_dtype"), ("sd", "dtype"),
                                       ("sd", "torch_dtype")])
def test_dtype_and_torch_dtype_load_either_library(tiny_folder, name, key, value):
    """`dtype` and `torch_dtype` mean the same for transformers models and diffusers pipelines (each library
    knows one of them), as a torch dtype or its name (diffusers silently ignored a name), and the weights are the
    saved ones cast."""
    folder = tiny_folder(name)
    lens = mmlens.load(folder, **{key: value})
    module = lens.model if name == "clip" else lens.model.unet
    assert lens.dtype == torch.bfloat16 and {p.dtype for p in module.parameters()} == {torch.bfloat16}
    saved = load_file(folder / ("model.safetensors" if name == "clip" else "unet/diffusion_pytorch_model.safetensors"))
    state = module.state_dict()
    key0 = next(iter(saved))
    torch.testing.assert_close(state[key0], saved[key0].to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dtype= or torch_dtype=, not both"):
        mmlens.load(folder, dtype=torch.float32, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype='bf16': not a torch dtype name"):
        mmlens.load(folder, dtype="bf16")


def test_device_moves_the_model_and_conflicts_with_device_map(tiny_folder, monkeypatch):
    moved = []
    real = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a or k) or real(self, *a, **k))
    lens = mmlens.load(tiny_folder("clip"), device="cpu")
    assert lens.device == torch.device("cpu") and moved[-1] == ("cpu",)
    with pytest.raises(ValueError, match="device= or device_map=, not both"):
        mmlens.load(tiny_folder("clip"), device="cpu", device_map="cpu")
