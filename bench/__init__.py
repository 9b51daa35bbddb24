"""`python -m bench`: a perf_analyzer-style benchmark of the running service.

The server runs as its own process (`python -m service`) on a free loopback port; this process is the client
(aiohttp, keep-alive). Closed-loop sweeps over concurrency and open-loop Poisson arrivals are measured in windows
until throughput is stable, and every figure is set against a limit measured in the same run: ONNX Runtime
called in-process on the same graph file, the same server's cheapest endpoint (GET /healthz), and a LitServe
server doing the same work on the same graphs.

    stats.py      percentiles, the stability rule, Poisson schedules (pure, unit-tested)
    prom.py       Prometheus text parsing and /metrics deltas -> queue wait / compute / batch size split
    server.py     start / stop the server subprocess
    load.py       the async load generator (closed and open loop)
    limits.py     the in-process ONNX Runtime limit and the sampling comparison
    scenarios.py  the five scenarios
    overload.py   overload and soak, with the open-loop generator of openloop.py
    compare.py    the litserve scenario: the same work on genserve and on litserve_peer.py
    report.py     terminal table, JSON, PNG plot, docs/benchmarks.md

Beside the main run: `python -m bench.latency` (single-request latency of every endpoint, for the
README) and `python -m bench.arena` (ONNX Runtime's memory arena and pattern settings).
"""
