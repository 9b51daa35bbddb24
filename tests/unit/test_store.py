"""Model-store validation: every way a version can be broken is reported precisely; good versions still load."""

from __future__ import annotations

import json
import shutil

import pytest

from service.store import StoreError, discover, load_store, read_manifest, validate_version


@pytest.fixture
def store(tiny_store, tmp_path):
    """A private copy of the tiny store that each test may break."""
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def _problems(vdir) -> list[str]:
    with pytest.raises(StoreError) as e:
        validate_version(vdir)
    return e.value.problems


def _edit_manifest(vdir, change):
    path = vdir / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def test_valid_store_loads_every_model(store):
    models, refused = load_store(store)
    assert sorted(models) == ["gan", "pixelcnn", "vae"] and refused == {}
    assert set(models["pixelcnn"][1].sessions) == {"logprob", "vstack", "hrow"}
    assert models["gan"][1].providers == ["CPUExecutionProvider"]


def test_missing_file(store):
    (store / "gan/1/generator.onnx").unlink()
    assert _problems(store / "gan/1") == ["file 'generator.onnx' is missing"]


def test_checksum_mismatch(store):
    with open(store / "vae/1/decoder.onnx", "ab") as f:
        f.write(b"\0")
    (p,) = _problems(store / "vae/1")
    assert p.startswith("file 'decoder.onnx' sha256 is")


def test_declared_tensors_must_match_the_graph(store):
    def change(m):
        m["graphs"]["generator"]["inputs"][0]["name"] = "noise"
        m["graphs"]["generator"]["outputs"][0]["shape"] = [None, 3, 28, 28]
        m["graphs"]["generator"]["inputs"][1]["dtype"] = "float32"
    _edit_manifest(store / "gan/1", change)
    problems = " | ".join(_problems(store / "gan/1"))
    assert "declared input 'noise' is not in the graph" in problems
    assert "output 'image' has shape [None, 1, 28, 28], manifest says [None, 3, 28, 28]" in problems
    assert "input 'label' has dtype int64, manifest says float32" in problems
    assert "graph inputs ['z'] are not declared" in problems


def test_graph_that_does_not_load(store):
    data = (store / "gan/1/generator.onnx")
    data.write_bytes(b"not an onnx graph")
    _edit_manifest(store / "gan/1", lambda m: m["files"]["generator.onnx"].update(
        sha256=__import__("hashlib").sha256(b"not an onnx graph").hexdigest(), bytes=17))
    (p,) = _problems(store / "gan/1")
    assert p.startswith("graph 'generator' (generator.onnx) does not load")


def test_manifest_schema_errors_name_the_key(store):
    _edit_manifest(store / "vae/1", lambda m: (m.update(version="one"), m["batching"].update(max_batch_size=0)))
    problems = _problems(store / "vae/1")
    assert any(p.startswith("manifest.version") for p in problems)
    assert any(p.startswith("manifest.batching.max_batch_size") for p in problems)


def test_invalid_json_and_missing_manifest(store):
    (store / "gan/1/manifest.json").write_text("{")
    assert _problems(store / "gan/1")[0].startswith("manifest.json is not valid JSON")
    (store / "gan/1/manifest.json").unlink()
    assert _problems(store / "gan/1") == ["manifest.json is missing"]


def test_family_needs_its_graphs_and_folders_must_agree(store):
    _edit_manifest(store / "pixelcnn/1", lambda m: m["graphs"].pop("hrow"))
    assert "family 'pixelcnn' needs graphs ['hrow']" in _problems(store / "pixelcnn/1")
    shutil.copytree(store / "gan/1", store / "gan/2")
    assert "folder is '2' but manifest.version is 1" in _problems(store / "gan/2")


def test_a_broken_version_is_refused_and_the_rest_still_serve(store):
    shutil.copytree(store / "gan/1", store / "gan/2")
    _edit_manifest(store / "gan/2", lambda m: m.update(version=2))
    (store / "gan/2/generator.onnx").write_bytes(b"x")
    (store / "notes").mkdir()                    # not a version folder: ignored
    models, refused = load_store(store)
    assert sorted(models["gan"]) == [1] and list(refused) == [str(store / "gan/2")]
    assert [p.name for p in discover(store)] == ["1", "2", "1", "1"]
    assert read_manifest(store / "gan/1").family == "gan"
