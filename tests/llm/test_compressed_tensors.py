"""kf.masks.export_compressed against compressed-tensors itself: its BitmaskCompressor (releases up
to 0.14) must produce the same tensors from the same masked weights, and its decompressor and
loader must give the masked weights back bit for bit; the bitmask helpers and config registry of
any release read the files.

`make setup` (scripts/setup.sh) installs compressed-tensors 0.14.0.1 without its dependencies: its
metadata asks for transformers<5, and what these tests use works with the transformers 5 that the
rest of the suite needs. The file skips only where compressed-tensors is not installed; an
installed release that fails to import fails the tests rather than skipping them."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

import koopfast as kf

if importlib.util.find_spec("compressed_tensors") is None:
    pytest.skip(
        "compressed-tensors is not installed (scripts/setup.sh installs 0.14.0.1, without its transformers<5 pin)",
        allow_module_level=True,
    )
import compressed_tensors  # installed: an import error is a failure, not a skip
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.utils import unpack_bitmasks


def _reference_compressor():
    name = "compressed_tensors.compressors.sparse_compressors.sparse_bitmask"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:  # skip only if the module or a package above it is absent
        if e.name is None or not (name + ".").startswith(e.name + "."):
            raise
    release = getattr(compressed_tensors, "__version__", "")
    pytest.skip(f"this compressed-tensors release ({release}) has no BitmaskCompressor (dropped after 0.14)")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))


def _masks(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    if kind == "2:4":  # 13 inputs: the first layer stays unstructured
        return {n: m for n, m in kf.masks.nm_masks(weights, 2, 4, by="abs").items() if weights[n].shape[1] % 4 == 0}
    return kf.masks.global_topk(weights, 0.6, by="abs")


def _masked(model: nn.Module, masks) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: torch.where(kf.masks.unpack(masks[k]), v, 0.0) if k in masks else v for k, v in state.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_tensors_as_their_compressor(kind, dtype):
    ref = _reference_compressor()
    model = _model().to(dtype)
    masks = _masks(model, kind)
    ours = kf.masks.export_compressed(model, kf.masks.pack(masks))
    config = SparsityCompressionConfig.load_from_registry(
        ours.config["sparsity_config"]["format"], **ours.config["sparsity_config"]
    )
    theirs = ref.BitmaskCompressor(config=config).compress(
        _masked(model, masks), compression_targets={n[: -len(".weight")] for n in masks}
    )
    assert list(ours.tensors) != [] and set(ours.tensors) == set(theirs)
    for key, value in theirs.items():
        got = ours.tensors[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(
            _bits(got) if got.is_floating_point() else got, _bits(value) if value.is_floating_point() else value
        ), key
    assert ours.config["sparsity_config"]["sparsity_structure"] == ("2:4" if kind == "2:4" else "unstructured")


def test_files_round_trip_through_their_loader_bit_for_bit(tmp_path):
    ref = _reference_compressor()
    from compressed_tensors.compressors import ModelCompressor

    model = _model()
    masks = _masks(model, "unstructured")
    with torch.no_grad():
        model[0].weight[0, masks["0.weight"][0]] = 0.0  # kept but zero: stored as absent, loads as zero
    result = kf.masks.export_compressed(model, masks, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config == json.loads(json.dumps(result.config))

    compressor = ModelCompressor.from_compression_config(config)
    assert isinstance(compressor.sparsity_compressor, ref.BitmaskCompressor)
    loaded = _model()
    for p in loaded.parameters():
        p.data.fill_(7.0)
    compressor.decompress(str(tmp_path), loaded)
    expected = _masked(model, masks)
    for key, value in loaded.state_dict().items():
        assert torch.equal(_bits(value), _bits(expected[key])), key
    zeros = sum(int((expected[n] == 0).sum()) for n in masks)
    assert config["sparsity_config"]["global_sparsity"] == zeros / sum(expected[n].numel() for n in masks)


def test_any_release_reads_the_bitmasks_and_config():
    model = _model()
    masks = _masks(model, "unstructured")
    out: dict[str, torch.Tensor] = {}
    result = kf.masks.export_compressed(model.state_dict(), masks, out)
    assert out.keys() == result.tensors.keys()
    config = SparsityCompressionConfig.load_from_registry("sparse-bitmask", **result.config["sparsity_config"])
    assert config.format == "sparse-bitmask" and set(config.targets) == {"0", "2", "4"}
    expected = _masked(model, masks)
    for name in masks:
        prefix = name[: -len(".weight")]
        shape = out[f"{prefix}.shape"].tolist()
        assert out[f"{prefix}.bitmask"].shape == (shape[0], -(-shape[1] // 8))
        present = unpack_bitmasks(out[f"{prefix}.bitmask"], shape)
        assert torch.equal(present, expected[name] != 0)
        dense = torch.zeros(shape).masked_scatter_(present, out[f"{prefix}.compressed"])
        assert torch.equal(_bits(dense), _bits(expected[name]))
        offsets = out[f"{prefix}.row_offsets"]
        assert offsets.dtype == torch.int64 and offsets.tolist() == [0, *present.sum(1).cumsum(0)[:-1].tolist()]
    assert torch.equal(out["0.bias"], model[0].bias.detach())


def test_hugging_face_model_folder_loads_in_their_loader(tmp_path):
    pytest.importorskip("transformers")
    ref = _reference_compressor()
    from compressed_tensors.compressors import ModelCompressor

    from koopfast.benchmarks import models

    torch.manual_seed(0)
    model = models.llama(vocab=48).eval()
    ids = torch.randint(1, 48, (2, 10))
    scores = kf.criteria.wanda(model, [ids])
    masks = kf.masks.nm_masks(scores, 2, 4)
    result = kf.masks.export_compressed(model, masks, tmp_path)
    assert result.config["sparsity_config"]["sparsity_structure"] == "2:4"
    document = json.loads((tmp_path / "config.json").read_text())
    assert document["model_type"] == "llama" and document["quantization_config"]["quant_method"] == "compressed-tensors"
    compressor = ModelCompressor.from_compression_config(document["quantization_config"])
    assert isinstance(compressor.sparsity_compressor, ref.BitmaskCompressor)
    torch.manual_seed(1)
    loaded = models.llama(vocab=48).eval()
    compressor.decompress(str(tmp_path), loaded)
    kf.masks.apply_(model, masks)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_bad_arguments_raise_before_anything_is_written(tmp_path):
    model = _model()
    masks = _masks(model, "unstructured")
    folder = tmp_path / "out"
    bad = [
        ({"0.bias": torch.ones(8, dtype=torch.bool)}, ValueError, "'<module>.weight'"),
        ({"9.weight": torch.ones(8, 13, dtype=torch.bool)}, KeyError, "state dict"),
        ({**masks, "2.weight": torch.ones(8, 8, dtype=torch.bool)}, ValueError, r"bool of shape \[16, 8\]"),
        ({"0.weight": torch.ones(8, 13)}, ValueError, "bool of shape"),
        ({}, TypeError, "non-empty"),
    ]
    for m, exc, match in bad:
        with pytest.raises(exc, match=match):
            kf.masks.export_compressed(model, m, folder)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match="2-D weights"):
        kf.masks.export_compressed(conv, {"0.weight": torch.ones(3, 2, 3, 3, dtype=torch.bool)}, folder)
    with pytest.raises(TypeError, match="model_or_state"):
        kf.masks.export_compressed([1], masks)
    with pytest.raises(TypeError, match="out"):
        kf.masks.export_compressed(model, masks, 3)
    assert not folder.exists()
