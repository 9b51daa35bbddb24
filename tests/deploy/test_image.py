"""The Dockerfile built and run for real (CPU variant, `--build-arg CUDA_LIBS=0`) on a Docker engine: the container
becomes ready and serves, runs as a non-root user, its own HEALTHCHECK turns healthy, and `docker stop` under load
loses no accepted request.

No image registry is reachable where the tests run, so the pinned base image (python:3.11.13-slim-bookworm) is a
stand-in built from Debian's packages by deploy/docker/base-image.sh (skipped when the tag exists). The engine is
Debian's docker.io (`make system-deps`): the one already running, or a dockerd started here without a bridge
network (the containers use the host's network and listen on 127.0.0.1 only) and stopped after. The tagged base
image and the build's layers stay behind, so a second run builds nothing."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.imaging import decode_images
from tests.deploy.conftest import REPO, free_port, require_tool, stop_process, wait_http

# A cold run builds the base image and the image (Debian packages and pinned wheels over the network): longer than
# the default per-test timeout, which covers fixtures too.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BASE_IMAGE_SCRIPT = REPO / "deploy" / "docker" / "base-image.sh"
IMAGE = "genserve-test:cpu"         # a tag of its own: the test never replaces an image someone built by hand
STOP_GRACE_S = 60                   # `docker stop --time`: SIGKILL only after this; draining takes far less


def docker_env() -> dict[str, str]:
    # The legacy builder: BuildKit would fetch the Dockerfile's `# syntax=` frontend image from a registry.
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


def run_docker(docker: str, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([docker, *args], capture_output=True, text=True, timeout=timeout, env=docker_env())
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc


def engine_answers(docker: str) -> bool:
    proc = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=30, env=docker_env())
    return proc.returncode == 0


# ------------------------------------------------------------------------------------------ fixtures

@contextmanager
def machine_wide_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """One test session at a time on this machine: a session must not stop the dockerd that another one uses,
    nor start a second dockerd on the same data root. Waits (bounded) for the other session to finish."""
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {path} for {timeout_s:.0f} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def docker(tmp_path_factory) -> Iterator[str]:
    """The docker client, talking to a running engine: the machine's own, or a dockerd started here."""
    client = require_tool("docker")                    # fails (never skips) naming `make system-deps`
    dockerd = require_tool("dockerd")
    with machine_wide_lock(Path(tempfile.gettempdir()) / "genserve-test-image.lock", timeout_s=480):
        yield from running_engine(client, dockerd, tmp_path_factory.mktemp("dockerd") / "dockerd.log")


def running_engine(client: str, dockerd: str, log: Path) -> Iterator[str]:
    """Yields the client once an engine answers; stops the dockerd it started, and only that one."""
    if engine_answers(client):
        yield client
        return
    with open(log, "w") as out:
        # No bridge and no iptables rules: containers use the host's network, and nothing of the host's firewall
        # is touched.
        proc = subprocess.Popen([dockerd, "--bridge=none", "--iptables=false"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not engine_answers(client):
            if proc.poll() is not None:
                # The one case that skips: this machine cannot run an engine (no root, missing kernel features).
                tail = "\n".join(log.read_text().splitlines()[-15:])
                pytest.skip(f"no Docker engine can start here: dockerd exited with {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                pytest.fail(f"dockerd runs but did not answer within 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield client
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def image(docker) -> str:
    """The CPU image, on the stand-in base image; both are reused when they exist (layer cache)."""
    base = subprocess.run(["bash", str(BASE_IMAGE_SCRIPT)], capture_output=True, text=True, timeout=600,
                          env={**docker_env(), "DOCKER": docker})
    assert base.returncode == 0, f"{BASE_IMAGE_SCRIPT.name} failed:\n{base.stdout[-3000:]}{base.stderr[-3000:]}"
    # --network host: the engine may have no bridge network, and pip in the builder stage needs the index.
    run_docker(docker, "build", "--network", "host", "--build-arg", "CUDA_LIBS=0", "--tag", IMAGE, str(REPO),
               timeout=600)
    return IMAGE


@dataclass
class Container:
    name: str
    base: str
    proc: subprocess.Popen           # the attached `docker run`: ends when the container does
    log: Path


@contextmanager
def container(docker: str, image: str, log: Path, *run_options: str) -> Iterator[Container]:
    """The image run on a free loopback port of the host's network; yields once /readyz answers 200, removes the
    container after."""
    port = free_port()
    name = f"genserve-test-{uuid.uuid4().hex[:12]}"
    with open(log, "w") as out:
        proc = subprocess.Popen([docker, "run", "--name", name, "--network", "host", "--env", "GENSERVE_HOST=127.0.0.1",
                                 "--env", f"GENSERVE_PORT={port}", *run_options, image],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz", proc, log, timeout_s=120)
        yield Container(name, base, proc, log)
    finally:
        run_docker(docker, "rm", "--force", name, check=False)
        stop_process(proc)


def inspect(docker: str, name: str, template: str) -> str:
    return run_docker(docker, "inspect", "--format", template, name).stdout.strip()


# ------------------------------------------------------------------------------------------ serving

def test_container_serves_as_non_root_and_turns_healthy(docker, image, tmp_path):
    # A short interval so that the first check comes soon; the command is the image's own HEALTHCHECK.
    with container(docker, image, tmp_path / "container.log", "--health-interval=1s") as c:
        r = httpx.post(c.base + "/v1/gan/sample", json={"n": 2, "seed": 7, "labels": [3, 8]}, timeout=30)
        assert r.status_code == 200, r.text
        images = decode_images(r.json()["images"])
        assert images.shape == (2, 28, 28) and images.max() > 0

        uid = run_docker(docker, "exec", c.name, "id", "-u").stdout.strip()
        assert uid.isdigit() and int(uid) != 0, f"the service runs as uid {uid}"
        assert inspect(docker, c.name, "{{.Config.User}}") == "10001:10001"

        image_check = json.loads(inspect(docker, image, "{{json .Config.Healthcheck.Test}}"))
        assert "/readyz" in " ".join(image_check)
        assert json.loads(inspect(docker, c.name, "{{json .Config.Healthcheck.Test}}")) == image_check
        deadline = time.monotonic() + 60
        while (status := inspect(docker, c.name, "{{.State.Health.Status}}")) != "healthy":
            if status != "starting" or time.monotonic() > deadline:
                health = inspect(docker, c.name, "{{json .State.Health}}")
                pytest.fail(f"health {status}: {health}\n{c.log.read_text()}")
            time.sleep(0.5)


# ------------------------------------------------------------------------------------------ docker stop under load

@dataclass
class Attempt:
    """One request on its own connection (Connection: close), as the client saw it."""
    path: str
    sent_at: float | None = None      # monotonic time once the whole request was written; None: never sent
    done_at: float = 0.0              # when the response ended or the attempt failed
    status: int | None = None
    complete: bool = False            # the whole response arrived (status line, headers, Content-Length bytes)
    error: str = ""


def attempt(port: int, path: str, payload: dict) -> Attempt:
    """A raw HTTP/1.1 request, so that each stage is known: connect (refused: the server no longer listens), send,
    and a response read to its end (a reset or EOF before that is a request without a response)."""
    a = Attempt(path)
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as e:
        a.error, a.done_at = f"connect: {e!r}", time.monotonic()
        return a
    with sock:
        sock.settimeout(120)
        try:
            sock.sendall(head + body)
        except OSError as e:
            a.error, a.done_at = f"send: {e!r}", time.monotonic()
            return a
        a.sent_at = time.monotonic()
        data = b""
        try:
            while chunk := sock.recv(1 << 16):
                data += chunk
        except OSError as e:
            a.error = f"receive: {e!r}"
        a.done_at = time.monotonic()
    header, sep, content = data.partition(b"\r\n\r\n")
    if sep:
        lines = header.decode("latin-1").split("\r\n")
        a.status = int(lines[0].split()[1])
        fields = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
        length = fields.get("content-length", "").strip()
        a.complete = length.isdigit() and len(content) == int(length)
        if a.complete and a.status == 200:             # both endpoints answer `n` images
            a.complete = len(json.loads(content)["images"]) == payload["n"]
    if not a.complete and not a.error:
        a.error = f"incomplete response: {len(data)} bytes"
    return a


@dataclass
class Load:
    """Client threads that each send one kind of request in a loop until the server refuses connections."""
    port: int
    stopped_at: float | None = None           # set just before `docker stop`
    attempts: list[Attempt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, path: str, payload: dict, deadline: float) -> None:
        while time.monotonic() < deadline:
            a = attempt(self.port, path, payload)
            with self.lock:
                self.attempts.append(a)
            if a.sent_at is None and self.stopped_at is not None:
                return                        # the server no longer accepts connections: it is going away
            if a.sent_at is None:
                time.sleep(0.05)              # before the stop a failed connect is a finding; no busy loop

    def answered(self, path: str) -> int:
        with self.lock:
            return sum(a.status == 200 for a in self.attempts if a.path == path)


def test_docker_stop_under_load_loses_no_accepted_request(docker, image, tmp_path):
    gan, pixelcnn = "/v1/gan/sample", "/v1/pixelcnn/sample"
    with container(docker, image, tmp_path / "container.log") as c:
        load = Load(port=int(c.base.rsplit(":", 1)[1]))
        deadline = time.monotonic() + 240
        # Fast GAN requests keep connections arriving; PixelCNN samples (784 sequential steps each) are the
        # long requests that must be finished, not cut, when the stop comes.
        threads = [threading.Thread(target=load.client, args=(gan, {"n": 4}, deadline)) for _ in range(4)]
        threads += [threading.Thread(target=load.client, args=(pixelcnn, {"n": 1}, deadline)) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            until = time.monotonic() + 60
            while load.answered(gan) < 20 or load.answered(pixelcnn) < 2:   # under load, long requests in flight
                assert time.monotonic() < until and c.proc.poll() is None, c.log.read_text()
                time.sleep(0.1)
            load.stopped_at = time.monotonic()
            stop = run_docker(docker, "stop", "--time", str(STOP_GRACE_S), c.name, timeout=STOP_GRACE_S + 30)
            stop_s = time.monotonic() - load.stopped_at
        finally:
            for t in threads:
                t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        exit_code = int(inspect(docker, c.name, "{{.State.ExitCode}}"))
        logs = c.log.read_text()

    assert stop.returncode == 0 and stop_s < STOP_GRACE_S, f"docker stop took {stop_s:.1f} s (SIGKILL)"
    assert exit_code in (0, 143), f"exit code {exit_code} (137: killed):\n{logs[-3000:]}"
    # Accepted: connected and the whole request written before `docker stop` was called, hence before the server
    # got SIGTERM and closed its listening socket. Each must have its complete response. Requests sent later may be
    # refused or cut: the server was already going away when they came.
    accepted = [a for a in load.attempts if a.sent_at is not None and a.sent_at < load.stopped_at]
    lost = [a for a in accepted if not a.complete]
    assert not lost, f"{len(lost)} of {len(accepted)} accepted requests lost, e.g. {lost[:3]}\n{logs[-3000:]}"
    statuses = {a.status for a in load.attempts if a.status is not None}
    assert statuses <= {200, 503}, f"statuses {statuses}: only 200 or 503 (shutting down) may answer"
    refused_early = [a for a in load.attempts if a.sent_at is None and a.done_at < load.stopped_at]
    assert not refused_early, f"requests failed before the stop: {refused_early[:3]}"
    # The drain finished long requests that were in flight at the stop.
    drained = [a for a in accepted if a.path == pixelcnn and a.status == 200 and a.done_at > load.stopped_at]
    assert drained, "no PixelCNN sample was in flight at the stop: the test did not exercise draining"
