"""README.md's examples, run against a real `python -m service` on the shipped models_store (loopback port), so
the README stays true by construction.

- Every ```bash block of "## API" and "## Open Inference Protocol (KServe V2)" is a curl example; each is sent as
  written and the real response, shortened by the README's stated rule (`shorten`), must equal the ```json block
  that follows it, text for text. Only the values named in NONDETERMINISTIC are exempt. A `| grep` example
  (/metrics) is followed by a ```text block: each line's series, name and labels, must exist (values aside).
- Every ```python block of "## Python client", "## Streaming progress" and "## Open Inference Protocol (KServe
  V2)" runs as a script in a subprocess, with this server's URL for http://127.0.0.1:8000; a line ending in
  `# -> <python literal>` asserts that the expression before the comment equals the literal (`with_checks`).
- The one curl example of "## Streaming progress" (`curl -N`, an event stream) is sent too; the ```text block
  after it shows the stream: its progress events must have the real ones' fields and total (their counts vary),
  a `...` line stands for more progress events, and its result must equal the real result, shortened.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import make_client, png_b64, server_process
from tests.conftest import REPO

README = REPO / "README.md"
STORE = REPO / "models_store"
README_HOST = "localhost:8000"                      # the curl examples' server
README_URL, README_HOSTPORT = "http://127.0.0.1:8000", "127.0.0.1:8000"   # the Python examples' server
PNG_PLACEHOLDER = "<base64 PNG>"                     # stands for the first held-out digit
CURL_SECTIONS = ("API", "Open Inference Protocol (KServe V2)")
PYTHON_SECTIONS = ("Python client", "Streaming progress", "Open Inference Protocol (KServe V2)")
STREAM_SECTION = "Streaming progress"
# path -> the top-level response fields whose value changes from run to run (the README shows an example value)
NONDETERMINISTIC = {"/readyz": {"pid"}, "/v1/models": {"process"}}
MAX_ITEMS, MAX_CHARS, DECIMALS = 3, 24, 4
CHECK = "# ->"
ENDPOINT = r"`([A-Z]+) (/\S*)`"                      # a "### `METHOD /path`" heading


# --- the README's rules -----------------------------------------------------------------------------------------

def shorten(value):
    """The README's rule for its example responses: a list past 3 items keeps 3 and ends in "...", a string past
    24 characters keeps 24 and gets "..." appended, a float is rounded to 4 decimals; dict keys are kept whole."""
    if isinstance(value, float):
        return round(value, DECIMALS)
    if isinstance(value, str):
        return value if len(value) <= MAX_CHARS else value[:MAX_CHARS] + "..."
    if isinstance(value, list):
        return [shorten(v) for v in value[:MAX_ITEMS]] + (["..."] if len(value) > MAX_ITEMS else [])
    if isinstance(value, dict):
        return {k: shorten(v) for k, v in value.items()}
    return value   # int, bool, None


def with_checks(source: str) -> str:
    """`expr  # -> literal` lines rewritten into asserts that `expr` equals the Python literal; other lines kept."""
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or not tok.string.startswith(CHECK):
            continue
        row, col = tok.start
        line = lines[row - 1]
        expression, literal = line[:col].strip(), tok.string[len(CHECK):].strip()
        try:
            ast.parse(expression, mode="eval")
            ast.literal_eval(literal)
        except (SyntaxError, ValueError) as exc:
            raise ValueError(f"README line {line!r}: `# ->` needs an expression before it and a Python literal "
                             f"after it ({exc})") from None
        indent = line[: len(line) - len(line.lstrip())]
        lines[row - 1] = (f"{indent}if (_readme_got := ({expression})) != ({literal}): "   # one line: line numbers kept
                          f"raise AssertionError(({line.strip()!r}, _readme_got))")      # not an assert: -O keeps it
    return "\n".join(lines) + "\n"


# --- parsing README.md ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    section: str       # the "## " heading above it
    subsection: str    # the "### " heading above it within the section, or ""
    lang: str
    text: str


@dataclass(frozen=True)
class CurlExample:
    where: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    grep: str | None = None
    expected_lang: str = "json"
    expected: str = ""


def read_blocks(markdown: str) -> list[Block]:
    """Every fenced block in order; a heading with no block under it appears as a Block of lang "" and no text."""
    blocks, section, subsection, lang, lines = [], "", "", None, []
    for line in markdown.splitlines():
        if lang is not None:
            if line.strip() == "```":
                blocks.append(Block(section, subsection, lang, "\n".join(lines)))
                lang = None
            else:
                lines.append(line)
        elif line.startswith("```"):
            lang, lines = line[3:].strip(), []
        elif line.startswith("## "):
            section, subsection = line[3:].strip(), ""
        elif line.startswith("### "):
            subsection = line[4:].strip()
            blocks.append(Block(section, subsection, "", ""))
    return blocks


def parse_curl(command: str) -> dict:
    """The request a README curl line sends: method, path, headers, body, and an optional `| grep PATTERN`."""
    words = shlex.split(command.replace("\\\n", " "))
    grep = None
    if "|" in words:
        at = words.index("|")
        words, tail = words[:at], words[at + 1:]
        if len(tail) != 2 or tail[0] != "grep":
            raise ValueError(f"only `| grep PATTERN` may follow curl, not {' '.join(tail)!r}")
        grep = tail[1]
    if not words or words[0] != "curl":
        raise ValueError(f"not a curl command: {command!r}")
    method, url, headers, body = None, None, {}, None
    rest = iter(words[1:])
    for word in rest:
        if word in ("-s", "-N"):   # silent; no output buffering (an event stream)
            continue
        if word == "-X":
            method = next(rest)
        elif word == "-H":
            name, _, value = next(rest).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "-d":
            body = next(rest)
        elif not word.startswith("-") and url is None:
            url = word
        else:
            raise ValueError(f"curl option {word!r} is not understood by this test")
    if url is None or not url.startswith(README_HOST + "/"):
        raise ValueError(f"curl URL must start with {README_HOST}/: {url!r}")
    return {"method": method or ("POST" if body is not None else "GET"), "path": url[len(README_HOST):],
            "headers": headers, "body": body, "grep": grep}


def curl_examples(markdown: str) -> tuple[list[CurlExample], list[str]]:
    """Every ```bash block of CURL_SECTIONS as an example, and a problem line for each one that is not one."""
    blocks = read_blocks(markdown)
    examples, problems = [], []
    for i, block in enumerate(blocks):
        if block.section not in CURL_SECTIONS or block.lang != "bash":
            continue
        where = block.subsection or block.section
        following = next((b for b in blocks[i + 1:] if b.lang), None)
        if following is None or (following.section, following.subsection) != (block.section, block.subsection) \
                or following.lang not in ("json", "text"):
            problems.append(f"{where}: the bash block is not followed by its ```json or ```text response")
            continue
        try:
            request = parse_curl(block.text)
        except (ValueError, StopIteration) as exc:
            problems.append(f"{where}: {exc or 'an option lacks its value'}")
            continue
        heading = re.fullmatch(ENDPOINT, block.subsection)
        if heading and (heading[1], heading[2]) != (request["method"], request["path"]):
            problems.append(f"{where}: the curl example sends {request['method']} {request['path']}")
        examples.append(CurlExample(f"{request['method']} {request['path']}", **request,
                                    expected_lang=following.lang, expected=following.text))
    return examples, problems


def python_blocks(markdown: str) -> list[tuple[str, str]]:
    """(id, source) of every ```python block of PYTHON_SECTIONS."""
    out = []
    for block in read_blocks(markdown):
        if block.section in PYTHON_SECTIONS and block.lang == "python":
            name = f"{block.section} {sum(1 for n, _ in out if n.startswith(block.section)) + 1}"
            out.append((name, block.text))
    return out


EXAMPLES, PROBLEMS = curl_examples(README.read_text())
PYTHON = python_blocks(README.read_text())


# --- the rules themselves, no server ----------------------------------------------------------------------------

def test_shorten_applies_the_readme_rule():
    real = {"images": ["x" * 30, "y" * 24], "mean": [0.123456, -1.99996, 2, 3.0], "n": 7, "ok": True,
            "shape": [None, 1, 28, 28], "labels": [3, 8], "nested": {"a-key-longer-than-24-characters": 0.02700001}}
    assert shorten(real) == {"images": ["x" * 24 + "...", "y" * 24], "mean": [0.1235, -2.0, 2, "..."], "n": 7,
                             "ok": True, "shape": [None, 1, 28, "..."], "labels": [3, 8],
                             "nested": {"a-key-longer-than-24-characters": 0.027}}


def test_with_checks_asserts_the_literal():
    source = "import math\nif True:\n    math.floor(2.5)   # -> 2\nx = '# -> not a check'  # a comment\n"
    rewritten = with_checks(source)
    exec(compile(rewritten, "<readme>", "exec"), {})
    assert rewritten.splitlines()[3] == source.splitlines()[3]
    with pytest.raises(AssertionError, match="math.floor"):
        exec(compile(with_checks("import math\nmath.floor(2.5)   # -> 3\n"), "<readme>", "exec"), {})
    with pytest.raises(ValueError, match="Python literal"):
        with_checks("x = 1  # -> one\n")


def test_parse_curl_reads_the_request():
    got = parse_curl("curl -s -X POST localhost:8000/v1/vae/sample \\\n  -H 'content-type: application/json' "
                     "-d '{\"n\": 2}'")
    assert got == {"method": "POST", "path": "/v1/vae/sample", "headers": {"content-type": "application/json"},
                   "body": '{"n": 2}', "grep": None}
    assert parse_curl("curl -s localhost:8000/metrics | grep genserve_x")["grep"] == "genserve_x"
    assert parse_curl("curl -s -N localhost:8000/healthz")["path"] == "/healthz"
    with pytest.raises(ValueError, match="-o"):
        parse_curl("curl -s -o out.json localhost:8000/healthz")


def test_every_bash_block_is_a_curl_example():
    """A new ```bash block in the API sections that this parser does not read fails here."""
    blocks = [b for b in read_blocks(README.read_text()) if b.section in CURL_SECTIONS]
    assert not PROBLEMS, "\n".join(PROBLEMS)
    assert len(EXAMPLES) == sum(b.lang == "bash" for b in blocks)
    endpoints = [b.subsection.strip("`") for b in blocks if not b.lang and re.fullmatch(ENDPOINT, b.subsection)]
    assert sorted(endpoints) == sorted(e.where for e in EXAMPLES if e.where in endpoints), \
        "every ### `METHOD /path` section holds exactly one curl example"
    assert len(EXAMPLES) >= 15 and len(PYTHON) >= 2   # the 14 /v1 examples and /v2's; a client and a V2 script


# --- against the real server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The shipped models on the CPU provider, as the README's responses were made."""
    log = tmp_path_factory.mktemp("readme-server") / "server.log"
    with server_process(STORE, log, providers="cpu") as (base, _):
        yield base


@pytest.fixture(scope="module")
def first_heldout_png() -> str:
    from training.data import load_dataset

    return png_b64(load_dataset().images[9])   # index 9: the first of the held-out split (i % 10 == 9)


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.where for e in EXAMPLES])
def test_curl_example(example: CurlExample, server, first_heldout_png):
    body = None if example.body is None else example.body.replace(PNG_PLACEHOLDER, first_heldout_png).encode()
    r = httpx.request(example.method, server + example.path, headers=example.headers, content=body, timeout=120)
    assert r.status_code == 200, r.text
    if example.grep is not None:
        found = {line.rsplit(" ", 1)[0] for line in r.text.splitlines() if re.search(example.grep, line)}
        for line in example.expected.splitlines():
            series, value = line.rsplit(" ", 1)
            float(value)
            assert series in found, f"README shows {series}; the server has {sorted(found)}"
        return
    real = r.json()
    readme = json.loads(example.expected)
    for name in NONDETERMINISTIC.get(example.path, ()):
        assert type(real[name]) is type(readme[name]), name
        real[name] = readme[name]
    assert shorten(real) == readme
    assert json.dumps(shorten(real)) == example.expected.strip()   # key order and layout as the server's


@pytest.mark.slow
def test_readyz_example_of_a_damaged_store(tmp_path, monkeypatch):
    """The README's second /readyz response, in full, of a store with one file truncated (the app in-process)."""
    markdown = README.read_text()
    damaged, size = re.search(r"With `(models_store/[^`]+)` truncated to ([\d,]+) bytes \(503, in full\):",
                              markdown).groups()
    responses = [b.text for b in read_blocks(markdown) if b.subsection == "`GET /readyz`" and b.lang == "json"]
    readme = json.loads(responses[1])
    shutil.copytree(STORE, tmp_path / "models_store")
    os.truncate(tmp_path / damaged, int(size.replace(",", "")))
    monkeypatch.chdir(tmp_path)                                    # the store named as in the README
    with make_client(Path("models_store"), warmup=False, providers="cpu") as client:
        deadline = time.monotonic() + 60
        while True:                                                # until every valid version has loaded
            r = client.get("/readyz")
            real = {**r.json(), "pid": readme["pid"]} if isinstance(r.json().get("pid"), int) else r.json()
            if real == readme or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert r.status_code == 503
    assert real == readme


@pytest.mark.slow
@pytest.mark.parametrize("name, source", PYTHON, ids=[name for name, _ in PYTHON])
def test_python_example(name: str, source: str, server, tmp_path):
    hostport = server.removeprefix("http://")
    script = tmp_path / (re.sub(r"\W+", "_", name).strip("_").lower() + ".py")
    script.write_text(with_checks(source.replace(README_URL, server).replace(README_HOSTPORT, hostport)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"README {name} failed:\n{done.stderr}"


def stream_example(markdown: str) -> tuple[dict, str]:
    """The request of "## Streaming progress"'s curl example and the stream shown after it."""
    blocks = [b for b in read_blocks(markdown) if b.section == STREAM_SECTION and b.lang in ("bash", "text")]
    assert [b.lang for b in blocks] == ["bash", "text"], "one curl example, then the stream it prints"
    return parse_curl(blocks[0].text), blocks[1].text


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(name, data) of each event of a text/event-stream body; comment lines skipped."""
    from genserve_client.client import _EventParser

    parser = _EventParser()
    return [(e[0], json.loads(e[1])) for line in text.split("\n") if (e := parser.feed(line)) is not None]


@pytest.mark.slow
def test_stream_example(server):
    request, shown = stream_example(README.read_text())
    r = httpx.request(request["method"], server + request["path"], headers=request["headers"],
                      content=request["body"].encode(), timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    real = sse_events(r.text)
    readme = sse_events("\n".join([*(line for line in shown.splitlines() if line != "..."), ""]))  # its last ends
    assert [name for name, _ in readme[:-1]] == ["progress"] * (len(readme) - 1) and readme[-1][0] == "result"
    assert [name for name, _ in real[:-1]] == ["progress"] * (len(real) - 1) and real[-1][0] == "result"
    assert len(real) >= len(readme)
    for _, progress in readme[:-1]:
        assert progress.keys() == real[0][1].keys() and progress["pixels_total"] == real[0][1]["pixels_total"]
    assert shorten(real[-1][1]) == readme[-1][1]
    result_line = shown.splitlines()[-1]
    assert result_line == "data: " + json.dumps(shorten(real[-1][1]), separators=(",", ":"))   # as sent


def documented_metrics(markdown: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) of each "- `genserve_...` (type; label, ...)" item of "## Metrics"."""
    section = markdown.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return {m[1]: (m[2], set(filter(None, (m[3] or "").split(", "))))
            for m in re.finditer(r"^- `(genserve_\w+)` \((\w+)(?:; ([\w, ]+))?\)", section, re.M)}


def exported_metrics(text: str) -> dict[str, tuple[str, set[str] | None]]:
    """name -> (type, label names, None when it has no sample yet) of each genserve_ family of a /metrics page;
    prometheus-client's `_created` companions left out."""
    kinds = {}
    for name, kind in re.findall(r"^# TYPE (genserve_\w+) (\w+)$", text, re.M):
        if not name.endswith("_created"):
            kinds[name + ("_total" if kind == "counter" and not name.endswith("_total") else "")] = kind
    labels: dict[str, set[str]] = {}
    for sample, inner in re.findall(r"^(genserve_\w+)(?:\{(.*)\})? \S+$", text, re.M):
        family = re.sub(r"_(bucket|count|sum)$", "", sample) if sample not in kinds else sample
        if family in kinds:
            labels.setdefault(family, set()).update(re.findall(r'(\w+)="(?:[^"\\]|\\.)*"', inner or ""))
    return {name: (kind, None if name not in labels else labels[name] - {"le"}) for name, kind in kinds.items()}


@pytest.mark.slow
def test_metrics_list_matches_the_server(server):
    """The "## Metrics" list names every series the server exports, with its type and labels."""
    documented = documented_metrics(README.read_text())
    exported = exported_metrics(httpx.get(server + "/metrics", timeout=30).text)
    assert sorted(documented) == sorted(exported)
    for name, (kind, labels) in exported.items():
        assert documented[name][0] == kind, name
        assert labels is None or documented[name][1] == labels, name
    assert sum(labels is not None for _, labels in exported.values()) >= 10   # most have samples to check
