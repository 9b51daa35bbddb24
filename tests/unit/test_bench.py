"""The pure parts of the benchmark: percentiles, the stability rule, /metrics deltas, Poisson schedules and the
docs marker replacement. No test here measures or asserts a speed."""

from __future__ import annotations

import asyncio
import math
import re
import time

import numpy as np
import pytest

from bench import prom, report
from bench.stats import is_stable, latency_summary, percentile, poisson_schedule, ratio


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    xs = np.random.default_rng(3).exponential(1.0, 101).tolist()
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_small_cases():
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0  # unsorted input
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_is_in_milliseconds():
    s = latency_summary([0.001, 0.002, 0.003])
    assert s["p50_ms"] == pytest.approx(2.0) and s["max_ms"] == pytest.approx(3.0)
    assert math.isnan(latency_summary([])["p99_ms"])


def test_stability_rule():
    assert not is_stable([])
    assert not is_stable([100.0])
    assert is_stable([10.0, 100.0, 105.0])           # only the last two count
    assert is_stable([100.0, 110.0])                  # 10 of 110: within 10%
    assert not is_stable([100.0, 112.0])
    assert not is_stable([112.0, 100.0])              # symmetric
    assert not is_stable([0.0, 0.0])                  # nothing finished is not a stable throughput
    assert is_stable([100.0, 119.0], tolerance=0.2)


def test_poisson_schedule_mean_rate_and_exponential_gaps():
    rate, duration = 50.0, 200.0
    t = poisson_schedule(rate, duration, np.random.default_rng(7))
    assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < duration
    assert len(t) / duration == pytest.approx(rate, rel=0.03)   # 10,000 expected: sd 1%
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)      # exponential: sd equals mean (not a fixed grid)


def test_poisson_schedule_is_seeded():
    a = poisson_schedule(5.0, 10.0, np.random.default_rng(1))
    b = poisson_schedule(5.0, 10.0, np.random.default_rng(1))
    c = poisson_schedule(5.0, 10.0, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError):
        poisson_schedule(0.0, 1.0, np.random.default_rng(0))


BEFORE = """\
# HELP genserve_queue_wait_seconds Time each item waited.
# TYPE genserve_queue_wait_seconds histogram
genserve_queue_wait_seconds_bucket{graph="logprob",le="0.001",model="pixelcnn",version="1"} 3.0
genserve_queue_wait_seconds_sum{graph="logprob",model="pixelcnn",version="1"} 0.5
genserve_queue_wait_seconds_count{graph="logprob",model="pixelcnn",version="1"} 10.0
genserve_queue_wait_seconds_sum{graph="generator",model="gan",version="1"} 9.0
genserve_queue_wait_seconds_count{graph="generator",model="gan",version="1"} 90.0
genserve_compute_seconds_sum{graph="logprob",model="pixelcnn",version="1"} 1.0
genserve_compute_seconds_count{graph="logprob",model="pixelcnn",version="1"} 4.0
genserve_batch_size_sum{graph="logprob",model="pixelcnn",version="1"} 10.0
genserve_batch_size_count{graph="logprob",model="pixelcnn",version="1"} 4.0
genserve_http_requests_total{method="GET",route="/say \\"hi\\"",status="200"} 2.0
"""

AFTER = """\
genserve_queue_wait_seconds_sum{graph="logprob",model="pixelcnn",version="1"} 2.5
genserve_queue_wait_seconds_count{graph="logprob",model="pixelcnn",version="1"} 110.0
genserve_queue_wait_seconds_sum{graph="logprob",model="pixelcnn",version="2"} 1.0
genserve_queue_wait_seconds_count{graph="logprob",model="pixelcnn",version="2"} 100.0
genserve_queue_wait_seconds_sum{graph="generator",model="gan",version="1"} 100.0
genserve_queue_wait_seconds_count{graph="generator",model="gan",version="1"} 1000.0
genserve_compute_seconds_sum{graph="logprob",model="pixelcnn",version="1"} 3.0
genserve_compute_seconds_count{graph="logprob",model="pixelcnn",version="1"} 8.0
genserve_batch_size_sum{graph="logprob",model="pixelcnn",version="1"} 110.0
genserve_batch_size_count{graph="logprob",model="pixelcnn",version="1"} 8.0
"""


def test_parse_labels_and_escapes():
    s = prom.parse(BEFORE)
    key = ("genserve_queue_wait_seconds_bucket", (("graph", "logprob"), ("le", "0.001"), ("model", "pixelcnn"),
                                                  ("version", "1")))
    assert s[key] == 3.0
    assert prom.total(s, "genserve_http_requests_total", route='/say "hi"') == 2.0
    assert prom.total(s, "genserve_queue_wait_seconds_count") == 100.0    # no labels: every series
    assert prom.total(s, "genserve_missing") == 0.0


def test_split_filters_by_model_and_graph_over_all_versions():
    before, after = prom.parse(BEFORE), prom.parse(AFTER)
    split = prom.split(before, after, "pixelcnn", "logprob")
    # queue wait: (2.5 + 1.0 - 0.5) s over (110 + 100 - 10) items = 15 ms per item (gan's series excluded)
    assert split["queue_wait_ms"] == pytest.approx(15.0)
    assert split["compute_per_batch_ms"] == pytest.approx(500.0)   # 2 s over 4 batches
    assert split["mean_batch_size"] == pytest.approx(25.0)         # 100 items over 4 batches
    assert split["batches"] == 4.0
    assert prom.split(before, after, "gan", "generator")["queue_wait_ms"] == pytest.approx(100.0)
    assert math.isnan(prom.split(after, after, "pixelcnn", "logprob")["queue_wait_ms"])  # nothing happened


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(1.0, float("nan")))


HAND = "# Benchmarks\n\nHand-written intro.\n\n## Tuning notes\n\nKeep me: max_delay_ms 2 -> 5.\n\n"


def test_replace_block_keeps_hand_written_text():
    first = report.replace_block(HAND, "table v1")
    assert first.startswith(HAND) and first.endswith(f"{report.BEGIN}\ntable v1\n{report.END}\n")
    after = first + "\n## Footer written by hand\n"
    second = report.replace_block(after, "table v2\n")
    assert second == after.replace("table v1", "table v2")
    assert second.count(report.BEGIN) == 1 and "v1" not in second


def test_replace_block_in_empty_text_and_regex_characters():
    out = report.replace_block("", r"a \1 $0 (x)")
    assert out == f"{report.BEGIN}\na \\1 $0 (x)\n{report.END}\n"   # the block is literal, not a regex template


def test_update_doc_creates_skeleton(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    report.update_doc(doc, "figures")
    text = doc.read_text()
    assert "## Tuning notes" in text and text.index("## Tuning notes") < text.index(report.BEGIN)
    doc.write_text(text.replace("## Tuning notes\n", "## Tuning notes\n\nmine\n"))
    report.update_doc(doc, "new figures")
    assert "mine" in doc.read_text() and "new figures" in doc.read_text() and "\nfigures" not in doc.read_text()


def test_json_is_strict(tmp_path):
    path = tmp_path / "r.json"
    report.write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {2: "x"}}, path)
    assert path.read_text().split() == '{ "a": null, "b": [ 1.0, null ], "c": { "2": "x" } }'.split()


def _fake_run() -> dict:
    from dataclasses import asdict

    from bench.load import Result

    def res(name, mode, level, rps, statuses=None, **kw):
        r = Result(name, mode, level, seconds=4.0, requests=int(rps * 4), ok=int(rps * 4), rps=rps, images_per_s=rps,
                   latency={"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0}, statuses=statuses or {"200": 8},
                   window_rps=[rps, rps, rps], stable=True, **kw)
        return asdict(r)

    floor = {"name": "gan ratio", "what": "ratio", "measured": 0.5, "floor": 0.6, "pass": False, "ceiling": 0.55}
    return {"machine": {"cpu": "Test CPU", "cores": 2, "ram": "1 GiB", "onnxruntime": "1", "provider": "CPU",
                        "python": "3", "platform": "linux", "date": "today"},
            "windows": {"seconds": 2.0, "max_windows": 8, "tolerance": 0.1}, "elapsed_s": 1.0,
            "scenarios": {"gan": {"results": [res("gan", "closed", 64, 500.0, {"200": 8, "503": 2})],
                                  "limits": {"http": res("healthz", "closed", 64, 1000.0,
                                                         cpu_us={"server": 150.0, "client": 140.0})},
                                  "floors": [floor]},
                          "iteration": {"results": [res("sample-shared", "open", 2.5, 2.4, offered=50, unfinished=1)],
                                        "iteration": {"single_latency_ms": 800.0, "rate_per_s": 2.5,
                                                      "duration_s": 20.0, "drain_s": 20.0, "p50_ratio": 9.0,
                                                      "throughput_ratio": 2.0, "shared_sustained": False},
                                        "floors": []}}}


def test_terminal_and_markdown_name_every_figure_and_floor():
    run = _fake_run()
    text = report.terminal(run)
    assert "gan ratio" in text and "FAIL" in text and "0.50x" in text and "503: 2" in text
    assert "2.50/s x50" in text and "unfinished: 1" in text and "1,000 requests/s" in text
    md = report.markdown(run, "images/bench.png")
    assert "| gan ratio | 0.50x | >= 0.6x | FAIL | 0.55x |" in md and "Test CPU, 2 cores" in md
    run["scenarios"]["gan"]["floors"][0]["framework_free"] = 0.38
    run["scenarios"]["gan"]["limits"]["bare"] = {
        "gan": run["scenarios"]["gan"]["results"][0] | {"rps": 380.0},
        "healthz": run["scenarios"]["gan"]["limits"]["http"] | {"rps": 1900.0}}
    run["scenarios"]["batching"] = {
        "results": [run["scenarios"]["gan"]["results"][0] | {"workload": w, "images_per_s": x}
                    for w, x in (("batch-on", 160.0), ("batch-off", 130.0))],
        "floors": [{"name": "batching ratio", "what": "ratio", "measured": 1.23, "floor": 3.0, "pass": False,
                    "ceiling": 1.44, "limit_images_per_s": 187.0}]}
    text = report.terminal(run)
    assert "on 160 images/s, off 130" in text and "(187 images/s), so on/off <= that limit / off = 1.44x" in text
    assert "0.55x; framework-free reference 0.38x" in text
    assert "380 requests/s at c=64, 0.20x its own /healthz (1,900/s) and 0.38x the service's" in text
    assert "| 150 + 140 |" in md and "CPU per request 150 + 140 us" in md
    assert "![" in md and "(images/bench.png)" in md and report.BEGIN not in md
    assert "one at a time serves 1.25/s" in md and "sequential / shared = 9.00x" in md
    assert "(sustained the rate): no" in md


def test_the_litserve_comparison_is_reported_side_by_side():
    run = _fake_run()
    assert "LitServe" not in report.terminal(run) and "genserve and LitServe" not in report.markdown(run, None)
    workload = {"concurrency": 64, "genserve_rps": 500.0, "litserve_rps": 400.0, "rps_ratio": 1.25,
                "genserve_p99_ms": 30.0, "litserve_p99_ms": 60.0, "p99_ratio": 0.5,
                "genserve_cpu_us": {"server": 600.0, "client": 130.0}, "litserve_cpu_us": {}}
    run["scenarios"]["litserve"] = {"results": [], "floors": [], "litserve": {
        "version": "0.2.19", "same_work": True, "batch_timeout_s": 0.001, "workloads": {"gan": workload}}}
    text, md = report.terminal(run), report.markdown(run, None)
    assert "LitServe 0.2.19" in text and "batch_timeout 1 ms" in text
    assert "| gan | c=64 | 500 | 400 | 1.25x | 30.0 | 60.0 | 0.50x | 600 + 130 | - |" in md
    assert "### genserve and LitServe" in md and "Same images and log-likelihoods from both: yes" in md


def test_gan_ceiling_is_healthz_cpu_over_healthz_plus_compute():
    from bench.load import Result
    from bench.scenarios import gan_ceiling

    hz = Result("healthz", "closed", 64, cpu_us={"server": 150.0, "client": 150.0})
    assert gan_ceiling(hz, {"min_cpu_us_per_image": 200.0}) == pytest.approx(0.6)


def test_process_tree_seconds_counts_children():
    import subprocess
    import sys

    from bench.cpu import process_tree_seconds

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n" \
           "import sys; sys.stdin.read()"
    # a parent whose child burns 0.3 s of CPU and then waits, so the tree is read while both are alive
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; p = subprocess.Popen([sys.executable, "
                               f"'-c', {burn!r}], stdin=subprocess.PIPE); p.wait()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not process_tree_seconds(parent.pid) >= 0.3:
            time.sleep(0.05)
        assert process_tree_seconds(parent.pid) >= 0.3
    finally:
        parent.kill()
        parent.wait(10)
    assert math.isnan(process_tree_seconds(parent.pid))


def test_logprob_limit_is_measured_once_a_run(monkeypatch):
    from bench import scenarios
    from bench.load import Windows
    from bench.server import REPO

    calls = []

    def fake_limit(graph, feeds, sizes, seconds, ort_spinning, ort_arena):
        calls.append((ort_spinning, ort_arena))
        assert feeds(3)["image"].shape == (3, 1, 28, 28)
        return {"images_per_s": (180.0 if ort_spinning else 170.0) + (5.0 if ort_arena == "session" else 0.0),
                "best_batch_size": 4, "provider": "CPU"}

    monkeypatch.setattr(scenarios.limits, "compute_limit", fake_limit)
    ctx = scenarios.Context(REPO / "models_store", True, Windows(), np.zeros((4, 28, 28), np.uint8), "zeros")
    first = scenarios.logprob_limit(ctx)
    # spinning on and off, each with the server's arena setting and ONNX Runtime's own, once each; the best counts
    assert scenarios.logprob_limit(ctx) is first
    assert sorted(calls) == [(False, "off"), (False, "session"), (True, "off"), (True, "session")]
    assert first["images_per_s"] == 185.0 and first["spinning"] and first["images_per_s_other_spinning"] == 175.0


def test_the_bench_is_tooling_beside_the_service_not_part_of_it():
    """bench/ ships neither in the image nor in the wheel (tests/unit/test_layout.py: the service never imports it)."""
    import tomllib

    from setuptools import find_packages

    from bench.server import REPO
    from tests.deploy.test_dockerfile import DOCKERFILE, copy_args, dockerignore_rules, excluded, instructions

    sources = [src for kind, args in instructions(DOCKERFILE.read_text()) if kind in ("COPY", "ADD")
               for src in copy_args(args)[1][:-1]]
    assert sources and not [s for s in sources if s.strip("./").split("/")[0] == "bench"]
    assert excluded("bench/__main__.py", dockerignore_rules())
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=REPO, include=include)
    assert "service" in packages and not [p for p in packages if p.split(".")[0] == "bench"]


def test_same_work_wants_the_same_images_and_log_likelihoods():
    from bench.compare import same_work

    def answers(image: str, logprob: float) -> dict:
        return {"gan": {"images": [image], "labels": [3]}, "logprob": {"results": [{"logprob": logprob}]}}

    assert same_work(answers("iVBOR", -150.0), answers("iVBOR", -150.0 * (1 + 1e-7)))
    assert not same_work(answers("iVBOR", -150.0), answers("iVBOX", -150.0))
    assert not same_work(answers("iVBOR", -150.0), answers("iVBOR", -151.0))


def test_clients_that_give_up_are_reported_beside_those_who_stay():
    run = _fake_run()
    runs = {mode: {"stayers": 20, "gave_up": gave_up, "stayers_latency": {"p50_ms": p50, "p99_ms": p99},
                   "cancelled": {"queued": queued, "sampling": sampling}, "sequence_steps": steps}
            for mode, gave_up, p50, p99, queued, sampling, steps in (("stay", 0, 2000.0, 4000.0, 0, 0, 1000.0),
                                                                      ("give_up", 9, 1500.0, 3000.0, 1, 8, 700.0))}
    run["scenarios"]["abandon"] = {"abandon": {"n_range": [4, 8], "rate_per_s": 1.5, "duration_s": 30.0,
                                               "load": 0.8, "share": 0.3, "give_up_s": 1.0, "runs": runs},
                                   "floors": []}
    text = report.terminal(run)
    assert "the 20 who stay in the other run see p50 2,000 ms, p99 4,000 ms" in text
    assert "30% give up after 1 s (9 did): those who stay see p50 1,500 ms, p99 3,000 ms" in text
    assert "8 cancelled while sampling and 1 while queued, and ran 700 sequence-steps against 1,000" in text


def test_a_client_that_gives_up_closes_its_connection():
    from bench import abandon

    async def main() -> tuple[str, bytes]:
        seen = asyncio.get_running_loop().create_future()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(await reader.read())  # everything the client sent, until it closes the connection
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        async with server:
            status = await abandon._request(server.sockets[0].getsockname()[1], b"GET / HTTP/1.1\r\n\r\n", 0.05)
            return status, await asyncio.wait_for(seen, 5)

    assert asyncio.run(main()) == ("gave_up", b"GET / HTTP/1.1\r\n\r\n")


def test_the_cost_of_guidance_is_reported_per_size():
    run = _fake_run()
    run["scenarios"]["guidance"] = {"guidance": {"weight": 0.5, "label": 3, "rows": [
        {"n": 1, "unguided_s": 0.4, "guided_s": 0.5, "ratio": 1.25},
        {"n": 64, "unguided_s": 6.0, "guided_s": 12.0, "ratio": 2.0}]}, "floors": []}
    text = report.terminal(run)
    assert "at the default weight 0.5: n=1 0.40 s against 0.50 s (1.25x); n=64 6.00 s against 12.00 s (2.00x)." in text


def test_the_memory_scenario_is_reported_with_its_floors():
    from bench import memory

    run = _fake_run()
    graphs = {"generator": {"session": {"seconds": 0.009, "rss_bytes": 10 * 2**20},
                            "warmup": {"seconds": 0.001, "rss_bytes": 2**20}}}
    m = {"startup_s": 0.81, "idle_s": 5.0,
         "rss_mib": {"before_loading": 73.0, "after_warmup": 126.0, "load_peak": 587.0, "after_load": 341.0,
                     "after_load_settled": 160.0, "after_idle": 145.0, "after_warmup_anon": 77.0,
                     "after_warmup_file": 49.0, "after_idle_anon": 92.0, "after_idle_file": 53.0},
         "process": {"startup": {"before_loading_s": 0.55, "ready_s": 0.72},
                     "models": {"gan": {"1": {"cold_start_s": 0.0133, "load": {"seconds": 0.0126, "rss_bytes": 2**23},
                                              "warmup": {"seconds": 0.001, "rss_bytes": 2**20}, "graphs": graphs}}}},
         "load": {"gan n=1": {"images_per_s": 70.0, "errors": {"503": 3}},
                  "logprob 1 image": {"images_per_s": 8.0, "errors": {"500": 1}}, "seconds": 61.0}}
    run["scenarios"]["memory"] = {"memory": m, "floors": []}
    text, md = report.terminal(run), report.markdown(run, None)
    assert re.search(r"after warm-up \(ready\) +126 +77 +49\n", text) and "load run (61 s), peak" in text
    assert "| after 5 s idle (memory given back) | 145 | 92 | 53 |" in md and "### Memory and cold start" in md
    assert "| at the load run's last answer | 341 | - | - |" in md and "| 1 s after the load run | 160 | - | - |" in md
    assert "| gan | 1 | all (with validation) | 8.0 | 12.6 | 1.0 | 1.0 | 0.013 |" in md
    assert "| gan | 1 | generator | 10.0 | 9.0 | 1.0 | 1.0 | - |" in md
    assert "process start to ready 0.81 s" in md and "3 requests shed (503)" in md
    assert memory.failed(m["load"]) == 1  # the 500, not the shed 503s
    floors = {"what": "max_mib", "measured": 126.0, "floor": 300.0}, {"what": "max_s", "measured": 0.81, "floor": 3.0}
    assert [r[1:3] for r in report.floor_rows([f | {"name": "x", "pass": True} for f in floors])] == \
        [["126 MiB", "<= 300 MiB"], ["0.81 s", "<= 3 s"]]


def test_the_lever_sweep_is_one_row_per_setting():
    from bench import memory

    row = {"lever": "defaults", "startup_s": 0.8, "rss_mib": {"after_warmup": 126.0, "load_peak": 500.0,
                                                              "after_load": 340.0, "after_load_settled": 150.0,
                                                              "after_idle": None},
           "load": {"gan n=1": {"images_per_s": 70.0}, "seconds": 60.0}}
    table = memory.sweep_table([row])
    assert table.splitlines()[0].startswith("| settings | ready s | after warm-up MiB |")
    assert table.splitlines()[-1] == "| defaults | 0.80 | 126 | 500 | 340 | 150 | - | 70.0 |"
    assert [name for name, _ in memory.LEVERS][:2] == [
        "before: arena per session, warm-up at 1 and 64, no slicing, no release", "warm-up at batch 1 only"]
    assert memory.LEVERS[0][1]["warmup_batch_sizes"] == "[1, 64]" and memory.LEVERS[6][1] == {}  # the defaults
