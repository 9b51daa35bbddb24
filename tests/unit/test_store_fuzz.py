"""Store fuzzing: whatever a store holds, load_store never raises, every valid version still loads, and every bad
entry is refused (or skipped) on its own, with one log line naming it.

Each layout is a store holding a valid gan/1 and valid copies gan/2..4, of which one to three get broken in a
random way (random, truncated, deep, huge or mistyped manifests, odd folder names, symlinks out of the store,
files and folders swapped, damaged ONNX files, wrong checksums), seeded so a failure can be replayed. Graphs are
opened by a stub that accepts exactly the template's bytes (what ONNX Runtime does with other bytes is tested
with real sessions on every REAL_EVERY-th layout, and in test_store.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import orjson
import pytest

from service.store import MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH, MAX_PROBLEMS, load_store, printable, sha256_file

LAYOUTS_PER_SEED = 60
SEEDS = range(4)                      # 240 layouts in all
REAL_EVERY = 20                       # every 20th layout opens real ONNX Runtime sessions


@dataclass
class Expect:
    what: str          # the mutation, for failure messages
    path: Path         # the entry it touched
    outcome: str       # "loads", "refused", "skipped" (a warning, not refused), "refused or skipped", "silent"


@dataclass
class Template:
    manifest: dict
    text: str          # the manifest as JSON, no trailing newline: any proper prefix of it is invalid JSON
    onnx: Path
    sha: str


@dataclass
class Layout:
    rng: random.Random
    store: Path
    outside: Path
    template: Template

    def version(self, n: int) -> Path:
        """gan/<n>: a valid copy of the template (manifest.version = n)."""
        vdir = self.store / "gan" / str(n)
        vdir.mkdir(parents=True)
        shutil.copyfile(self.template.onnx, vdir / "generator.onnx")
        self.write(vdir, {**self.template.manifest, "version": n})
        return vdir

    @staticmethod
    def write(vdir: Path, manifest: dict) -> None:
        (vdir / "manifest.json").write_text(json.dumps(manifest))

    def manifest(self, vdir: Path) -> dict:
        return {**self.template.manifest, "version": int(vdir.name)}


# ----------------------------------------------------------------------------- mutations of one version folder


def random_bytes_manifest(lay: Layout, vdir: Path) -> Expect:
    (vdir / "manifest.json").write_bytes(lay.rng.randbytes(lay.rng.randrange(0, 4000)))
    return Expect("random bytes manifest", vdir, "refused")


def truncated_manifest(lay: Layout, vdir: Path) -> Expect:
    text = json.dumps(lay.manifest(vdir))
    (vdir / "manifest.json").write_text(text[:lay.rng.randrange(0, len(text))])
    return Expect("truncated manifest", vdir, "refused")


def deep_manifest(lay: Layout, vdir: Path) -> Expect:
    depth = lay.rng.choice([*range(MAX_MANIFEST_DEPTH - 6, MAX_MANIFEST_DEPTH + 4), 1000, 100_000])
    text = json.dumps(lay.manifest(vdir)).replace('"metrics": {', f'"metrics": {{"d": {"[" * depth}{"]" * depth}, ', 1)
    (vdir / "manifest.json").write_text(text)
    total = depth + 2  # the manifest object and its metrics
    return Expect(f"manifest nested {total} deep", vdir, "loads" if total <= MAX_MANIFEST_DEPTH else "refused")


def huge_manifest(lay: Layout, vdir: Path) -> Expect:
    size = lay.rng.choice([MAX_MANIFEST_BYTES - 10_000, MAX_MANIFEST_BYTES, MAX_MANIFEST_BYTES + 1,
                           3 * MAX_MANIFEST_BYTES])
    text = json.dumps({**lay.manifest(vdir), "description": ""})
    text = text.replace('"description": ""', '"description": "' + "x" * max(0, size - len(text)) + '"', 1)
    (vdir / "manifest.json").write_text(text)
    fits = len(text.encode()) <= MAX_MANIFEST_BYTES
    return Expect(f"manifest of {len(text)} bytes", vdir, "loads" if fits else "refused")


_WRONG_VALUES: dict[str, list] = {
    "schema_version": [3, 0, None],
    "version": [None, 2.5, -1, 0, [], {}, "two", 10 ** 10],
    "name": [None, 7, "Gan", "", "g an", "ĝan", "gan\n"],
    "family": ["cnn", None, 1, "GAN"],
    "files": [[], "x", {"generator.onnx": {"sha256": "xyz", "bytes": 1}}, {"generator.onnx": None}, {}],
    "graphs": [[], {"generator": 5}, {}, {"generator": {"file": "generator.onnx", "inputs": "x", "outputs": []}}],
    "batching": [{"max_batch_size": 0}, {"max_batch_size": "lots"}, {"extra": 1}, []],
    "attributes": [{"thick": {"description": "", "unit": "", "mean": 0, "std": 0, "direction": []}}, [1]],
    "unknown_key": [1, None, "x"],
}


def wrong_type(lay: Layout, vdir: Path) -> Expect:
    m = lay.manifest(vdir)
    if lay.rng.random() < 0.1:
        data = lay.rng.choice([[m], "manifest", 3, None, []])
    else:
        key = lay.rng.choice(sorted(_WRONG_VALUES))
        data = {**m, key: lay.rng.choice(_WRONG_VALUES[key])}
    (vdir / "manifest.json").write_text(json.dumps(data))
    return Expect(f"wrong types: {json.dumps(data)[:80]}", vdir, "refused")


def special_values(lay: Layout, vdir: Path) -> Expect:
    value = lay.rng.choice(["NaN", "-Infinity", str(2 ** 64), "9" * 5000, '"\\ud800"', '{"\\udfff": 1}'])
    text = json.dumps(lay.manifest(vdir)).replace('"metrics": {', f'"metrics": {{"v": {value}, ', 1)
    (vdir / "manifest.json").write_text(text)
    return Expect(f"special value {value[:20]}", vdir, "refused")


def many_problems(lay: Layout, vdir: Path) -> Expect:
    m = lay.manifest(vdir)
    m["files"] = {**m["files"], **{f"f{i}": {"sha256": "0" * 64, "bytes": 1} for i in range(1000)}}
    lay.write(vdir, m)
    return Expect("1000 missing files", vdir, "refused")


def escaping_file_name(lay: Layout, vdir: Path) -> Expect:
    m = lay.manifest(vdir)
    name = lay.rng.choice(["/etc/hostname", "../../../../etc/hostname", "/dev/zero", "..", "", "a\u0000b"])
    m["files"] = {**m["files"], name: m["files"]["generator.onnx"]}
    lay.write(vdir, m)
    return Expect(f"file name {name!r}", vdir, "refused")


def missing_or_empty_manifest(lay: Layout, vdir: Path) -> Expect:
    if lay.rng.random() < 0.5:
        (vdir / "manifest.json").unlink()
    else:
        (vdir / "manifest.json").write_bytes(b"")
    return Expect("missing or empty manifest", vdir, "refused")


def damaged_onnx(lay: Layout, vdir: Path) -> Expect:
    onnx = vdir / "generator.onnx"
    data = onnx.read_bytes()
    how = lay.rng.choice(["truncated", "zeroed", "random", "bit flip"])
    if how == "truncated":
        data = data[:lay.rng.randrange(0, len(data))]
    elif how == "zeroed":
        data = bytes(len(data))
    elif how == "random":
        data = lay.rng.randbytes(lay.rng.randrange(1, 5000))
    else:
        i = lay.rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ 1 << lay.rng.randrange(8)]) + data[i + 1:]
    onnx.write_bytes(data)
    fixed = lay.rng.random() < 0.5
    if fixed:  # the manifest agrees with the damaged bytes: only opening the graph can find the damage
        m = lay.manifest(vdir)
        m["files"] = {"generator.onnx": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
        lay.write(vdir, m)
    # a flipped bit may leave a graph that still opens (a weight changed): then the version loads, which is right
    outcome = "loads or refused" if fixed and how == "bit flip" else "refused"
    return Expect(f"{how} ONNX file, checksum {'updated' if fixed else 'kept'}", vdir, outcome)


def checksum_mismatch(lay: Layout, vdir: Path) -> Expect:
    m = lay.manifest(vdir)
    m["files"] = {"generator.onnx": {"sha256": lay.rng.randbytes(32).hex(), "bytes": 1}}
    lay.write(vdir, m)
    return Expect("checksum mismatch", vdir, "refused")


def symlink_out(lay: Layout, vdir: Path) -> Expect:
    target = lay.outside / vdir.name
    if not target.exists():
        shutil.copytree(vdir, target)
    which = lay.rng.choice(["version folder", "manifest.json", "generator.onnx"])
    if which == "version folder":
        shutil.rmtree(vdir)
        vdir.symlink_to(target)
    else:
        (vdir / which).unlink()
        (vdir / which).symlink_to(target / which)
    return Expect(f"{which} symlinked out of the store", vdir, "refused")


def symlink_loop(lay: Layout, vdir: Path) -> Expect:
    which = lay.rng.choice(["version folder", "manifest.json", "generator.onnx"])
    if which == "version folder":
        shutil.rmtree(vdir)
        vdir.symlink_to(vdir.name)
    else:
        (vdir / which).unlink()
        (vdir / which).symlink_to(which)
    return Expect(f"{which} is a symlink loop", vdir, "refused")


def file_as_dir(lay: Layout, vdir: Path) -> Expect:
    which = lay.rng.choice(["manifest.json", "generator.onnx"])
    (vdir / which).unlink()
    (vdir / which).mkdir()
    return Expect(f"{which} is a folder", vdir, "refused")


def dir_as_file(lay: Layout, vdir: Path) -> Expect:
    shutil.rmtree(vdir)
    vdir.write_bytes(lay.rng.randbytes(lay.rng.randrange(0, 100)))
    return Expect("version folder is a file", vdir, "refused")


_ODD_NAMES = ["²", "٣", "１", "0", "02", "00", "1234567890", "latest", "v2", "2.0", " 2", "2 ", "+2", "-2", "2\n",
              "Ⅻ", "½", "notes", "README", "1e3", "0x2", "２", "߂", "𝟚", "\t", " ", "\\", "'", '"', ".hidden"]


def _random_name(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return rng.choice(_ODD_NAMES)
    if kind < 0.8:  # random code points, some of them digits of other scripts
        alphabet = [chr(c) for c in (*range(0x20, 0x7f), *range(0xa0, 0x250), *range(0x660, 0x66a), *range(0xff10,
                                     0xff1a), 0x1d7d8, 0x2460, 0x3007)]
        name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))).replace("/", "_")
    else:  # bytes that are not UTF-8: Python keeps them as lone surrogates
        name = os.fsdecode(bytes(rng.choice([*range(1, 47), *range(48, 256)]) for _ in range(rng.randrange(1, 8))))
    return name if name not in ("", ".", "..") else "_"


def odd_folder_name(lay: Layout, vdir: Path) -> Expect:
    name = _random_name(lay.rng)
    new = vdir.parent / name
    if new.exists() or new.is_symlink():
        return Expect("unchanged (name taken)", vdir, "loads")
    vdir.rename(new)
    if name.startswith("."):
        return Expect(f"folder named {name!r}", new, "silent")
    # a numeric name is refused (it shows); a name that is no number may be skipped with a warning instead
    return Expect(f"folder named {name!r}", new, "refused" if name.isnumeric() else "refused or skipped")


def unchanged(lay: Layout, vdir: Path) -> Expect:
    return Expect("unchanged", vdir, "loads")


VERSION_MUTATIONS: list[Callable[[Layout, Path], Expect]] = [
    random_bytes_manifest, truncated_manifest, deep_manifest, huge_manifest, wrong_type, special_values,
    many_problems, escaping_file_name, missing_or_empty_manifest, damaged_onnx, checksum_mismatch, symlink_out,
    symlink_loop, file_as_dir, dir_as_file, odd_folder_name, unchanged,
]


# ----------------------------------------------------------------------------- mutations at the top of the store


def model_folder_as_file(lay: Layout) -> Expect:
    path = lay.store / _random_name(lay.rng).replace("/", "_")
    if path.exists() or path.name.startswith("."):
        return Expect("unchanged (name taken)", path, "silent")
    path.write_bytes(lay.rng.randbytes(10))
    return Expect("a file at the top of the store", path, "skipped")


def model_folder_out(lay: Layout) -> Expect:
    target = lay.outside / "extra"
    shutil.copytree(lay.store / "gan/1", target / "1")
    Layout.write(target / "1", {**lay.template.manifest, "name": "extra"})
    (lay.store / "extra").symlink_to(target)
    return Expect("model folder symlinked out of the store", lay.store / "extra", "refused")


def model_folder_badly_named(lay: Layout) -> Expect:
    name = lay.rng.choice(["Gan", "gan!", "1gan", "_gan", "gän", "-", "gan.v2", os.fsdecode(b"gan\xff")])
    shutil.copytree(lay.store / "gan/1", lay.store / name / "1")
    return Expect(f"model folder named {name!r}", lay.store / name, "refused")


STORE_MUTATIONS = [model_folder_as_file, model_folder_out, model_folder_badly_named]


# ----------------------------------------------------------------------------- the invariant


@pytest.fixture(scope="module")
def template(tiny_store, tmp_path_factory) -> Template:
    src = tmp_path_factory.mktemp("template")
    shutil.copyfile(tiny_store / "gan/1/generator.onnx", src / "generator.onnx")
    manifest = json.loads((tiny_store / "gan/1/manifest.json").read_text())
    return Template(manifest, json.dumps(manifest), src / "generator.onnx", sha256_file(src / "generator.onnx"))


def _sessions(template: Template, real: bool):
    """make_session for load_store: real ONNX Runtime sessions, or a stub that opens the template's bytes only."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1

    def real_session(path: Path):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if real:
        return real_session
    opened = real_session(template.onnx)

    def stub(path: Path):
        if sha256_file(path) != template.sha:
            raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : stub: not the template's bytes")
        return opened
    return stub


def _lines(caplog, path: Path, level: int, exact_level: bool = False) -> list[str]:
    """Log lines of the store about exactly this entry ('<path>: <why>')."""
    key = printable(str(path)) + ": "
    return [r.getMessage() for r in caplog.records if r.name == "service.store" and key in r.getMessage()
            and (r.levelno == level if exact_level else r.levelno >= level)]


def _check(caplog, expect: Expect, models, refused) -> None:
    key = printable(str(expect.path))
    version = int(expect.path.name) if expect.path.name.isascii() and expect.path.name.isdigit() else None
    loaded = version is not None and expect.path.parent.name == "gan" and version in models.get("gan", {})
    errors = _lines(caplog, expect.path, logging.ERROR)
    warnings = _lines(caplog, expect.path, logging.WARNING, exact_level=True)
    is_refused = key in refused and len(errors) == 1 and not warnings
    is_skipped = key not in refused and len(warnings) == 1 and not errors and not loaded
    if key in refused:
        problems = refused[key]
        assert problems and all(isinstance(p, str) and p and p.isprintable() for p in problems), problems
        assert len(problems) <= MAX_PROBLEMS + 1
    ok = {
        "loads": loaded and key not in refused and not errors and not warnings,
        "refused": is_refused and not loaded,
        "skipped": is_skipped,
        "refused or skipped": (is_refused and not loaded) or is_skipped,
        "loads or refused": (loaded and key not in refused) or (is_refused and not loaded),
        "silent": not loaded and key not in refused and not errors and not warnings,
    }[expect.outcome]
    assert ok, (expect, refused.get(key), errors, warnings)


def _layout(rng: random.Random, root: Path, template: Template) -> tuple[Layout, list[Expect]]:
    lay = Layout(rng, root / "store", root / "outside", template)
    lay.outside.mkdir(parents=True)
    lay.version(1)
    expects = []
    for n in rng.sample([2, 3, 4], rng.randrange(1, 4)):
        expects.append(rng.choice(VERSION_MUTATIONS)(lay, lay.version(n)))
    if rng.random() < 0.3:
        expects.append(rng.choice(STORE_MUTATIONS)(lay))
    return lay, expects


@pytest.mark.parametrize("seed", SEEDS)
def test_any_store_content_fails_alone(template, tmp_path, caplog, seed):
    caplog.set_level(logging.INFO, logger="service.store")
    stub = _sessions(template, real=False)
    for i in range(LAYOUTS_PER_SEED):
        rng = random.Random(seed * 1_000_003 + i)
        lay, expects = _layout(rng, tmp_path / str(i), template)
        caplog.clear()
        real = i % REAL_EVERY == 0
        models, refused = load_store(lay.store, _sessions(template, real=True) if real else stub)
        context = f"seed {seed}, layout {i} ({'real sessions' if real else 'stub sessions'})"
        assert 1 in models.get("gan", {}), (context, refused)            # the valid version always loads
        for expect in expects:
            try:
                _check(caplog, expect, models, refused)
            except AssertionError as e:
                raise AssertionError(f"{context}: {e}") from None
        orjson.dumps(refused)                                             # /readyz and /v1/models can show it
        assert all(r.getMessage().isprintable() for r in caplog.records if r.name == "service.store"), context
        shutil.rmtree(tmp_path / str(i))
