"""Model-store validation: every way a version can be broken is reported precisely; good versions still load."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import orjson
import pytest

from service import store as store_module
from service.store import (
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_DEPTH,
    MAX_PROBLEMS,
    StoreError,
    discover,
    json_depth,
    load_store,
    open_regular,
    printable,
    read_manifest,
    validate_version,
)


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
    assert set(models["pixelcnn"][1].sessions) == {"logprob", "vstack", "hrow", "vstep", "hstep"}
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


def test_family_needs_the_tensors_the_service_calls_and_a_fixed_image_size(store):
    """The families read names and image geometry from the manifest: a version lacking them is refused at load,
    not answered 500 by the first request that needs them."""
    _edit_manifest(store / "gan/1", lambda m: m["graphs"]["generator"]["outputs"][0].update(name="picture"))
    assert "graph 'generator' needs tensors ['image']" in _problems(store / "gan/1")
    _edit_manifest(store / "vae/1", lambda m: m["graphs"]["encoder"]["inputs"][0].update(shape=[None, 1, None, 28]))
    assert "graph 'encoder' tensor 'image' needs a fixed height and width, got [None, 1, None, 28]" in _problems(
        store / "vae/1")


def test_the_step_graphs_come_together_with_their_tensors(store):
    """A PixelCNN version may add vstep and hstep, both, with the tensors the cached sampler feeds and the cache
    shape it allocates from; without them it is still a valid version (sampled the row-cached way)."""
    _edit_manifest(store / "pixelcnn/1", lambda m: m["graphs"].pop("hstep"))
    assert "graphs ['hstep', 'vstep'] come together; this version has only ['vstep']" in _problems(
        store / "pixelcnn/1")
    _edit_manifest(store / "pixelcnn/1", lambda m: m["graphs"].pop("vstep"))
    validate_version(store / "pixelcnn/1")  # neither: a version as exported before the step graphs


def test_the_step_graphs_declare_their_cache(store):
    def loosen(m):
        m["graphs"]["vstep"]["inputs"][1]["shape"] = [None, None, 8, 2, 28]
        m["graphs"]["hstep"]["outputs"][1].update(name="h")

    _edit_manifest(store / "pixelcnn/1", loosen)
    problems = _problems(store / "pixelcnn/1")
    assert "graph 'hstep' needs tensors ['hnew']" in problems
    assert any(p.startswith("graph 'vstep': input 'vcache'") for p in problems), problems  # not the graph's own


@pytest.mark.parametrize("graph, tensor, shape, problem", [
    ("vstep", "vcache", [None, None, 8, 2, 28], "tensor 'vcache' needs fixed layers, channels, rows and width"),
    ("vstep", "vcache", [None, 1, 8, 2, 20], "tensor 'vcache' is 20 wide, the images 28"),  # the tiny preset:
    ("hstep", "hcache", [None, 1, 8, 1, 3], "tensor 'hcache' must be (batch, 1, 8, 1, 2)"),  # 2 layers of 8
    ("vstep", "vnew", [None, 1, 16, None, 28], "tensor 'vnew' must be (batch, 1, 8, n, 28)"),
    ("hstep", "vfeats", [None, 3, 32, 1, None], "the vertical features of vstack, vstep and hstep differ"),
])
def test_the_step_graphs_must_fit_each_other(store, graph, tensor, shape, problem):
    """As declared: the graphs themselves are held to their declarations by the load (the test above), and a real
    export of mismatched step graphs is refused (tests/integration/test_sampling_parity.py)."""
    manifest = read_manifest(store / "pixelcnn/1")
    spec = manifest.graphs[graph]
    for t in (*spec.inputs, *spec.outputs):
        if t.name == tensor:
            t.shape = shape
    assert any(problem in p for p in store_module._step_problems(manifest)), store_module._step_problems(manifest)


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


# ----------------------------------------------------------------------------- what fails must fail alone
# Each case below breaks one entry of an otherwise valid store: load_store must not raise, the entry must be
# refused (or skipped) with exactly one log line naming it, and every model must still load.


def _second_gan(store, version: int = 2):
    """gan/<version>: a valid copy of gan/1 (manifest.version edited to match), which loads on its own."""
    vdir = store / "gan" / str(version)
    shutil.copytree(store / "gan/1", vdir)
    _edit_manifest(vdir, lambda m: m.update(version=version))
    return vdir


def _log_lines(caplog, path, level=logging.WARNING) -> list[str]:
    key = printable(str(path))
    return [r.getMessage() for r in caplog.records if r.name == "service.store" and r.levelno >= level
            and key in r.getMessage()]


def _refused_alone(store, caplog, path, make_session=None) -> list[str]:
    """Load the store; `path` must be refused with one error line and every model must still load. Returns its
    problems."""
    caplog.set_level(logging.INFO, logger="service.store")
    models, refused = load_store(store, make_session)
    assert sorted(models) == ["gan", "pixelcnn", "vae"] and 1 in models["gan"]
    key = printable(str(path))
    assert key in refused and refused[key], refused
    assert len(_log_lines(caplog, path, logging.ERROR)) == 1, caplog.text
    orjson.dumps(refused)  # /readyz and /v1/models show it: it must encode
    return refused[key]


def _skipped_alone(store, caplog, path) -> str:
    """Load the store; `path` must be skipped with one warning naming it, and be neither loaded nor refused."""
    caplog.set_level(logging.INFO, logger="service.store")
    models, refused = load_store(store)
    assert sorted(models) == ["gan", "pixelcnn", "vae"] and sorted(models["gan"]) == [1]
    assert printable(str(path)) not in refused
    (line,) = _log_lines(caplog, path)
    return line


def test_a_manifest_of_random_bytes_refuses_only_its_version(store, caplog):
    vdir = _second_gan(store)
    (vdir / "manifest.json").write_bytes(bytes(range(256)) * 4)
    (p,) = _refused_alone(store, caplog, vdir)
    assert p.startswith("manifest.json is not UTF-8 text")


def test_a_manifest_nested_too_deep_is_refused_before_parsing(store, caplog):
    vdir = _second_gan(store)
    (vdir / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)  # json.loads would hit RecursionError
    assert _refused_alone(store, caplog, vdir) == [
        f"manifest.json nests 100000 levels deep, more than {MAX_MANIFEST_DEPTH}"]


def test_manifest_depth_is_capped_but_real_nesting_loads(store, caplog):
    def nest(depth):
        value = 1
        for _ in range(depth):
            value = {"x": [value]}
        return value

    vdir = _second_gan(store)
    _edit_manifest(vdir, lambda m: m["metrics"].update(deep=nest(MAX_MANIFEST_DEPTH)))  # 2 + 2 * 32 levels
    (p,) = _refused_alone(store, caplog, vdir)
    assert "levels deep" in p
    _edit_manifest(vdir, lambda m: m["metrics"].update(deep=nest(MAX_MANIFEST_DEPTH // 2 - 2)))
    assert sorted(load_store(store)[0]["gan"]) == [1, 2]
    assert json_depth('{"a": "[[[[{{{{", "b": ["\\"[["]}') == 2  # brackets inside strings do not nest


@pytest.mark.parametrize("text", ['{"a": "' + '\\"' * (MAX_MANIFEST_BYTES // 2 - 4),   # an unclosed string
                                  '"' * MAX_MANIFEST_BYTES, "[" * MAX_MANIFEST_BYTES])
def test_depth_is_measured_in_linear_time(text):
    # a string scan restarted at each escaped quote once took quadratic time: hours for one 1 MiB manifest
    t0 = time.perf_counter()
    json_depth(text)
    assert time.perf_counter() - t0 < 5.0


def test_a_manifest_too_large_is_refused_before_it_is_read(store, caplog):
    vdir = _second_gan(store)
    (vdir / "manifest.json").write_bytes(b"\xff" * (MAX_MANIFEST_BYTES + 1))  # not even UTF-8: never decoded
    assert _refused_alone(store, caplog, vdir) == [f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes"]


def test_a_valid_but_huge_manifest_is_refused(store, caplog):
    vdir = _second_gan(store)
    _edit_manifest(vdir, lambda m: m.update(description="x" * MAX_MANIFEST_BYTES))
    (p,) = _refused_alone(store, caplog, vdir)
    assert "larger than" in p


@pytest.mark.parametrize(("value", "why"), [
    ("NaN", "NaN is not JSON"),
    ("1" + "0" * 5000, "not valid JSON"),                          # int() refuses more than 4300 digits
    (str(2 ** 70), "cannot answer with"),                           # past 64 bits: the JSON encoder refuses it
    ('"\\ud800"', "cannot answer with"),                            # a lone surrogate: not encodable as UTF-8
])
def test_manifest_values_the_service_could_not_answer_with_are_refused(store, caplog, value, why):
    vdir = _second_gan(store)
    text = (vdir / "manifest.json").read_text()
    (vdir / "manifest.json").write_text(text.replace('"metrics": {', f'"metrics": {{"bad": {value}, ', 1))
    (p,) = _refused_alone(store, caplog, vdir)
    assert why in p


@pytest.mark.parametrize("name", ["²", "٣", "１", "0", "02", "1234567890"])
def test_numeric_folder_names_that_are_not_version_numbers_are_refused(store, caplog, name):
    vdir = store / "gan" / name
    shutil.copytree(store / "gan/1", vdir)  # '²'.isdigit() is True but int('²') raises
    (p,) = _refused_alone(store, caplog, vdir)
    assert p.startswith(f"'{name}' is not a version number")
    assert [v.name for v in discover(store)] == ["1", "1", "1"]


@pytest.mark.parametrize("name", ["latest", "notes", "v2", "README.md"])
def test_other_names_in_a_model_folder_are_skipped_with_a_warning(store, caplog, name):
    (store / "gan" / name).symlink_to("1") if name == "latest" else (store / "gan" / name).mkdir()
    line = _skipped_alone(store, caplog, store / "gan" / name)
    assert "skipping" in line and "not a version number" in line


def test_hidden_entries_are_skipped_silently(store, caplog):
    shutil.copytree(store / "gan/1", store / "gan/.2-staging/gan/2")  # training stages a version like this
    shutil.copytree(store / "gan/1", store / "gan/.3-staging")
    (store / "gan/.3-staging/generator.onnx").write_bytes(b"half written")
    shutil.copytree(store / "gan", store / ".gan-old")
    caplog.set_level(logging.INFO, logger="service.store")
    models, refused = load_store(store)
    assert sorted(models) == ["gan", "pixelcnn", "vae"] and sorted(models["gan"]) == [1] and refused == {}
    assert "staging" not in caplog.text and "gan-old" not in caplog.text


def test_undecodable_names_are_reported_printably(store, caplog):
    bad = store / os.fsdecode(b"gan\xff")          # a model folder whose name is not UTF-8 (nor a model name)
    shutil.copytree(store / "gan", bad)
    (p,) = _refused_alone(store, caplog, bad)
    assert "is not a valid model name" in p and printable(str(bad)).endswith("gan\\udcff")
    (store / os.fsdecode(b"gan\xff")).rename(store / "gan" / os.fsdecode(b"\xfe"))   # a version folder name
    caplog.clear()
    line = _skipped_alone(store, caplog, store / "gan" / os.fsdecode(b"\xfe"))
    assert line.isprintable()


def test_a_model_folder_with_an_invalid_name_is_refused_as_a_whole(store, caplog):
    shutil.copytree(store / "gan", store / "Gan")
    (p,) = _refused_alone(store, caplog, store / "Gan")
    assert p == "'Gan' is not a valid model name ([a-z][a-z0-9_-]*)"


def test_a_model_folder_that_is_a_file_is_skipped_with_a_warning(store, caplog):
    (store / "extra").write_bytes(b"\0" * 10)
    assert "not a folder" in _skipped_alone(store, caplog, store / "extra")


def test_a_version_that_is_a_file_is_refused(store, caplog):
    (store / "gan/2").write_bytes(b"\0" * 10)
    assert _refused_alone(store, caplog, store / "gan/2") == ["a version must be a folder, and this is not one"]


def _outside_copy(store, tmp_path):
    """A valid gan v2 outside the store."""
    out = tmp_path / "elsewhere" / "gan" / "2"
    shutil.copytree(store / "gan/1", out)
    _edit_manifest(out, lambda m: m.update(version=2))
    return out


def test_a_version_folder_symlinked_out_of_the_store_is_refused(store, tmp_path, caplog):
    (store / "gan/2").symlink_to(_outside_copy(store, tmp_path))
    (p,) = _refused_alone(store, caplog, store / "gan/2")
    assert p.startswith("the version folder resolves outside the store")


def test_a_model_folder_symlinked_out_of_the_store_is_refused(store, tmp_path, caplog):
    out = _outside_copy(store, tmp_path)
    (store / "more").symlink_to(out.parent.parent / "more")
    shutil.copytree(out.parent, out.parent.parent / "more")
    _edit_manifest(out.parent.parent / "more/2", lambda m: m.update(name="more"))
    (p,) = _refused_alone(store, caplog, store / "more")
    assert p.startswith("the model folder resolves outside the store")


def test_a_manifest_symlinked_out_of_the_store_is_refused(store, tmp_path, caplog):
    vdir = _second_gan(store)
    (vdir / "manifest.json").unlink()
    (vdir / "manifest.json").symlink_to(_outside_copy(store, tmp_path) / "manifest.json")
    (p,) = _refused_alone(store, caplog, vdir)
    assert p.startswith("manifest.json resolves outside the store")


def test_an_onnx_file_symlinked_out_of_the_store_is_refused_and_inside_is_fine(store, tmp_path, caplog):
    vdir = _second_gan(store)
    (vdir / "generator.onnx").unlink()
    (vdir / "generator.onnx").symlink_to("../1/generator.onnx")  # inside the store: fine
    assert sorted(load_store(store)[0]["gan"]) == [1, 2]
    (vdir / "generator.onnx").unlink()
    (vdir / "generator.onnx").symlink_to(_outside_copy(store, tmp_path) / "generator.onnx")
    (p,) = _refused_alone(store, caplog, vdir)
    assert p.startswith("file 'generator.onnx' resolves outside the store")


def test_manifest_file_names_cannot_leave_the_store(store, caplog):
    vdir = _second_gan(store)
    _edit_manifest(vdir, lambda m: m["files"].update({"/etc/hostname": m["files"]["generator.onnx"],
                                                      "../../../x": m["files"]["generator.onnx"]}))
    problems = _refused_alone(store, caplog, vdir)
    assert sum("resolves outside the store" in p for p in problems) == 2, problems


def test_a_symlink_loop_is_refused(store, caplog):
    (store / "gan/2").symlink_to("2")
    (p,) = _refused_alone(store, caplog, store / "gan/2")
    assert "real path cannot be worked out" in p


def test_files_that_are_directories_are_refused(store, caplog):
    vdir = _second_gan(store)
    (vdir / "generator.onnx").unlink()
    (vdir / "generator.onnx").mkdir()
    assert _refused_alone(store, caplog, vdir) == ["file 'generator.onnx' is not a regular file"]
    caplog.clear()
    (vdir / "manifest.json").unlink()
    (vdir / "manifest.json").mkdir()
    assert _refused_alone(store, caplog, vdir) == ["manifest.json is not a regular file"]


def _unreadable(monkeypatch, path):
    """Opening `path` fails as chmod 000 would for anyone but root (tests run as root, who may read anything)."""
    def failing(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == os.fspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real(file, *args, **kwargs)
        return opener
    # every way in: open() and io.open (pathlib's read_text), and os.open
    monkeypatch.setattr(builtins, "open", failing(builtins.open))
    monkeypatch.setattr(io, "open", failing(io.open))
    monkeypatch.setattr(os, "open", failing(os.open))


def test_only_regular_files_are_ever_read(store):
    # checked on the open file, not only before: what is opened is what is read (no FIFOs here: one that a
    # regression opened without O_NONBLOCK would block the test)
    for path in (store / "gan", Path("/dev/null")):
        with pytest.raises(OSError, match="not a regular file"):
            open_regular(path)
    with open_regular(store / "gan/1/manifest.json") as f:
        assert json.loads(f.read())["name"] == "gan"


@pytest.mark.parametrize("name", ["manifest.json", "generator.onnx"])
def test_unreadable_files_are_refused(store, caplog, monkeypatch, name):
    vdir = _second_gan(store)
    _unreadable(monkeypatch, vdir / name)
    (p,) = _refused_alone(store, caplog, vdir)
    assert "cannot be read: [Errno 13] Permission denied" in p


def test_problems_are_capped_so_one_log_line_stays_readable(store, caplog):
    vdir = _second_gan(store)
    _edit_manifest(vdir, lambda m: m["files"].update({f"f{i}": {"sha256": "0" * 64, "bytes": 1} for i in range(100)}))
    problems = _refused_alone(store, caplog, vdir)
    assert len(problems) == MAX_PROBLEMS + 1 and problems[-1] == "... and 80 more problems"


def test_a_graph_failing_without_a_message_is_still_reported(store, caplog):
    import onnxruntime as ort
    vdir = _second_gan(store)

    def make_session(path):
        if path.parent == vdir:
            raise KeyError()
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (p,) = _refused_alone(store, caplog, vdir, make_session)
    assert p == "graph 'generator' (generator.onnx) does not load: KeyError"


def test_an_unexpected_error_refuses_only_its_version(store, caplog, monkeypatch):
    vdir = _second_gan(store)
    real = store_module.read_manifest

    def read_manifest(version_dir):
        if version_dir == vdir:
            raise ZeroDivisionError("a bug in a check")
        return real(version_dir)
    monkeypatch.setattr(store_module, "read_manifest", read_manifest)
    (p,) = _refused_alone(store, caplog, vdir)
    assert p == "validation failed unexpectedly: ZeroDivisionError: a bug in a check"
