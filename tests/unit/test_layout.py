"""The direction of dependencies, read from the code's own imports (docs/architecture.md draws them).

The service serves; tooling (bench/, training/) and the client stand beside it and import it, never the
reverse. Inside the service, HTTP stays at the edge: the families, the runtime and the scheduling core
(batcher, sampler) know nothing of FastAPI or Starlette, and only the app and the routes' own package import
the routes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "service"

# Top-level packages no module of the service may import: tooling, the client, and what only they install.
NOT_IN_THE_SERVICE = {"bench", "training", "genserve_client", "tests", "aiohttp", "litserve", "torch", "httpx",
                      "tritonclient"}
HTTP = {"fastapi", "starlette", "uvicorn", "fastapi_offline"}
# Modules that know nothing of HTTP (and so nothing of routes, errors or the app either).
HTTP_FREE = ["batcher.py", "sampler.py", "scheduling.py", "runtime.py", "store.py", "imaging.py", "metrics.py",
             "families/*.py", "settings.py", "schemas.py", "v2_codec.py", "control.py", "repository.py"]
SERVICE_EDGE = {"service.app", "service.routes", "service.errors", "service.middleware", "service.protocol",
                "service.openapi", "service.auth", "service.__main__"}


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """The absolute module names a file imports (`from x import y` gives x; relative imports resolved against
    `package`, by default the file's own in the repository)."""
    package = package or ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module or "")
    return names


def _matches(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _files(patterns: list[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in SERVICE.glob(pattern)})


def test_the_service_imports_no_tooling_no_client_and_no_dev_dependency():
    offenders = {f"{p.relative_to(REPO)} imports {n}" for p in SERVICE.rglob("*.py") for n in imports_of(p)
                 if n.split(".")[0] in NOT_IN_THE_SERVICE}
    assert not offenders, sorted(offenders)


@pytest.mark.parametrize("path", _files(HTTP_FREE), ids=lambda p: str(p.relative_to(SERVICE)))
def test_the_core_knows_nothing_of_http(path):
    bad = {n for n in imports_of(path) if n.split(".")[0] in HTTP or _matches(n, SERVICE_EDGE)}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_only_the_app_imports_the_routes():
    outside = [p for p in SERVICE.rglob("*.py") if "routes" not in p.parts and p.name != "app.py"]
    offenders = {f"{p.relative_to(REPO)} imports {n}" for p in outside for n in imports_of(p)
                 if _matches(n, {"service.routes"})}
    assert not offenders, sorted(offenders)


def test_tooling_and_the_client_import_the_service_not_each_other():
    """bench/ may use training/ (it measures what training made); training/ and the client stay apart from the
    bench, and the client from training (it is installed alone, with the service's schemas)."""
    rules = {"training": {"bench", "genserve_client"}, "genserve_client": {"bench", "training"}}
    offenders = {f"{p.relative_to(REPO)} imports {n}" for top, banned in rules.items()
                 for p in (REPO / top).rglob("*.py") for n in imports_of(p) if n.split(".")[0] in banned}
    assert not offenders, sorted(offenders)


def test_the_reader_resolves_every_form_of_import(tmp_path):
    """An import the reader missed would pass every rule above."""
    probe = tmp_path / "probe.py"
    probe.write_text("import fastapi.responses\nfrom ..routes import common\nfrom . import gan\n"
                     "def f():\n    from bench.server import Server\n")
    assert imports_of(probe, "service.families") == {"fastapi.responses", "service.routes", "service.families",
                                                      "bench.server"}


def _readme_layout_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## How it works"):]
    start = section.index("```\n") + 4
    return section[start:section.index("```", start)]


def test_the_readme_layout_block_matches_the_tree():
    """Every module of the service, the training code and the client is named in README's layout block, and
    every file or folder it names exists (bench/'s modules are summarised, not listed)."""
    import re

    block = _readme_layout_block()
    named_files = set(re.findall(r"\b([\w]+\.py)\b", block))
    named_dirs = set(re.findall(r"(?<![\w/])([\w]+)/", block))
    modules = {p.name for top in ("service", "training", "genserve_client") for p in (REPO / top).rglob("*.py")
               if p.name != "__init__.py"}
    assert not modules - named_files, f"not in README's layout block: {sorted(modules - named_files)}"
    existing = {p.name for top in ("service", "training", "genserve_client", "bench")
                for p in (REPO / top).rglob("*.py")}
    assert not named_files - existing, f"README's layout block names missing files: {sorted(named_files - existing)}"
    dirs = {p.name for p in REPO.glob("*/") if p.is_dir()} | {p.name for d in ("service", "deploy", "tests")
                                                               for p in (REPO / d).iterdir() if p.is_dir()}
    assert not named_dirs - dirs, f"README's layout block names missing folders: {sorted(named_dirs - dirs)}"
