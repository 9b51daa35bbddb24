"""Where moving /v1 image work off the event loop starts to pay: python -m bench.offload

Times, on this machine, one `asyncio.to_thread` round trip (what a request waits for the hop) against the same
work done inline for n images: decoding request images (base64 PNG and 28x28 int arrays), encoding response
images (PNG and array, with the orjson render of the list), a logprob reply's per_pixel maps (lists and
render) and an anomaly reply's complexity (the images' smallest PNGs). Prints medians and, per kind of work,
the smallest n whose inline time exceeds the hop, and the smallest whose inline time exceeds the GIL's switch
interval. The service's thresholds (service.routes.common)
come from this output; docs/ holds the figures.

A thread does not run Python in parallel with the loop: the GIL passes between them when one waits (Pillow's
decoder and zlib let go of it) or every sys.getswitchinterval() seconds. So the script also measures what other
coroutines see: how late a coroutine that wakes every TICK_S runs, at worst, while the work runs inline or in a
thread.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import numpy as np
import orjson

from service.families.pixelcnn import logprob_results
from service.imaging import decode_images, encode_images, encode_png_b64, png_bits
from training.data import load_dataset

SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
PAUSE_SIZES = (8, 32, 64, 128, 256)


def median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def hop_us(repeat: int) -> tuple[float, float]:
    """(median, p90) microseconds of `await asyncio.to_thread(nothing)` on a running loop."""
    def nothing():
        return None
    for _ in range(200):  # start the default executor's threads
        await asyncio.to_thread(nothing)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await asyncio.to_thread(nothing)
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.9 * len(times))] * 1e6


def workloads(images: np.ndarray, log_probs: np.ndarray) -> dict:
    pngs = [encode_png_b64(im) for im in images]
    arrays = images.tolist()
    return {
        "decode png": lambda n: decode_images(pngs[:n]),
        "decode array": lambda n: decode_images(arrays[:n]),
        "encode png": lambda n: orjson.dumps({"images": encode_images(images[:n], "png")}),
        "encode array": lambda n: orjson.dumps({"images": encode_images(images[:n], "array")}),
        "per_pixel": lambda n: orjson.dumps({"results": logprob_results({"log_probs": log_probs[:n]}, per_pixel=True)}),
        "complexity": lambda n: png_bits(images[:n]),
    }


TICK_S = 0.0002


async def longest_pause_us(work, n: int, offload: bool, repeat: int) -> float:
    """Median over `repeat` runs of the work of the longest delay of a coroutine that wakes every TICK_S (as a
    server's loop wakes for the next request): how much later than asked it ran."""
    async def ticker(gaps: list[float], running: asyncio.Event):
        while running.is_set():
            asked = time.perf_counter()
            await asyncio.sleep(TICK_S)
            gaps.append(time.perf_counter() - asked - TICK_S)

    pauses = []
    for _ in range(repeat):
        gaps, running = [], asyncio.Event()
        running.set()
        task = asyncio.create_task(ticker(gaps, running))
        await asyncio.sleep(2 * TICK_S)
        if offload:
            await asyncio.to_thread(work, n)
        else:
            work(n)
        await asyncio.sleep(2 * TICK_S)
        running.clear()
        await task
        pauses.append(max(gaps))
    return statistics.median(pauses) * 1e6


async def pauses(images: np.ndarray, log_probs: np.ndarray, sizes: tuple[int, ...]) -> None:
    print(f"worst lateness of a coroutine waking every {TICK_S * 1e6:g} us, inline / in a thread (switch interval "
          f"{sys.getswitchinterval() * 1e3:g} ms), us")
    print(f"{'work':<14}" + "".join(f"{n:>17}" for n in sizes))
    for name, work in workloads(images, log_probs).items():
        row = []
        for n in sizes:
            inline = await longest_pause_us(work, n, False, repeat=max(5, 200 // n))
            thread = await longest_pause_us(work, n, True, repeat=max(5, 200 // n))
            row.append(f"{inline:>8.0f} / {thread:<6.0f}")
        print(f"{name:<14}" + "".join(f"{r:>17}" for r in row))


def main() -> None:
    images = load_dataset().images[:max(SIZES)]                               # (256, 28, 28) uint8
    rng = np.random.default_rng(0)
    log_probs = np.log(rng.uniform(0.01, 1.0, images.shape)).astype(np.float32)  # (256, 28, 28) nats
    hop, hop_p90 = asyncio.run(hop_us(5000))
    print(f"asyncio.to_thread round trip: median {hop:.1f} us, p90 {hop_p90:.1f} us")
    switch_us = sys.getswitchinterval() * 1e6
    print(f"{'work (us)':<14}" + "".join(f"{n:>9}" for n in SIZES) + "   first n above: the hop, the switch interval")
    for name, work in workloads(images, log_probs).items():
        costs = [median_us(lambda n=n, work=work: work(n), repeat=max(20, 2000 // n)) for n in SIZES]
        above_hop = next((n for n, c in zip(SIZES, costs, strict=True) if c > hop), None)
        above_switch = next((n for n, c in zip(SIZES, costs, strict=True) if c > switch_us), None)
        print(f"{name:<14}" + "".join(f"{c:>9.1f}" for c in costs) + f"   {above_hop}, {above_switch}")
    asyncio.run(pauses(images, log_probs, PAUSE_SIZES))


if __name__ == "__main__":
    main()
