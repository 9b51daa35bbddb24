"""The server's memory and cold start on the shipped store, held to the figures the README documents: RSS after
warm-up, and after a burst of the largest calls once the server has given memory back, within 25% of the README's
table (tests/conftest.py reads it); ready within the 3 s cold-start budget; GET /v1/models reports the process."""

from __future__ import annotations

import httpx
import pytest

from service.memory import process_memory
from tests.api.conftest import server_process, wait_for
from tests.conftest import REPO, documented_memory_mib

SHIPPED_STORE = REPO / "models_store"
MARGIN = 1.25           # issue 17: the test fails past the documented figure + 25%
COLD_START_S = 3.0      # issue 17: process start to ready, with the shipped store
MIB = 2**20


@pytest.mark.slow
def test_rss_after_warm_up_and_after_a_burst_stays_within_the_documented_figures(tmp_path):
    documented = documented_memory_mib()
    # the release comes 1 s after the last call instead of 5: the same release, sooner
    with server_process(SHIPPED_STORE, tmp_path / "server.log", memory_release_idle_s="1") as (base, proc):
        ready = process_memory(proc.pid)["rss_bytes"]
        assert ready <= MARGIN * documented["after_warmup"] * MIB, \
            f"RSS after warm-up {ready / MIB:.0f} MiB, documented {documented['after_warmup']:.0f} MiB"

        process = httpx.get(base + "/v1/models", timeout=30).json()["process"]
        assert process["pid"] == proc.pid
        assert 0.8 * ready <= process["rss_bytes"] <= 1.25 * ready
        assert process["rss_peak_bytes"] >= process["rss_bytes"]
        assert 0 < process["startup"]["before_loading_s"] < process["startup"]["ready_s"] <= COLD_START_S
        shipped = {(m.name, v.name) for m in SHIPPED_STORE.iterdir() if m.is_dir() for v in m.iterdir()
                   if v.name.isdigit()}
        assert {(m, v) for m, versions in process["models"].items() for v in versions} == shipped
        for versions in process["models"].values():
            for v in versions.values():
                assert 0 < v["cold_start_s"] <= COLD_START_S
                assert all(g["session"]["seconds"] > 0 and g["warmup"]["seconds"] >= 0 for g in v["graphs"].values())

        # The largest calls: 64 images scored at once, 16 guided samples (32 sequences per step).
        digits = [[[(r * c) % 256 for c in range(28)] for r in range(28)]] * 64
        r = httpx.post(base + "/v1/pixelcnn/logprob", json={"images": digits}, timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(base + "/v1/pixelcnn/sample", json={"n": 16, "labels": 3, "seed": 1}, timeout=300)
        assert r.status_code == 200, r.text
        releases = process["release"]["releases"]
        wait_for("a memory release after the burst", lambda: httpx.get(base + "/v1/models", timeout=30).json()
                 ["process"]["release"]["releases"] > releases, timeout_s=60)
        idle = process_memory(proc.pid)["rss_bytes"]
        assert idle <= MARGIN * documented["after_idle"] * MIB, \
            f"RSS after the burst and the idle release {idle / MIB:.0f} MiB, documented {documented['after_idle']:.0f}"
