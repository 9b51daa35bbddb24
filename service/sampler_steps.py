"""How one step of iteration-level PixelCNN sampling gets its logits: one pixel for every active sequence, each at
its own position, each with its own caches. Two ways, by the graphs a model version has:

RowSteps (vstack, hrow; every version): a sequence entering a row gets that row's vertical features from vstack
    over the rows above it; every step runs hrow over each sequence's whole current row, 28 positions for one
    pixel. This is the row-cached sampler (sample_fast).
CachedSteps (vstep, hstep; versions exported with them): Ramachandran et al., 2017, "Fast Generation for
    Convolutional Autoregressive Models". Every layer's activations stay cached per sequence, here on the host: a
    sequence entering row r runs vstep on that one row, reading the p rows above it from its `vcache`; every step
    runs hstep on one position, reading the p positions to its left from its `hcache`. Nothing is recomputed.
    A sequence that joins mid-image (a completion) fills its caches in one call per stack: vstep on rows 0..r
    at once and hstep on the columns left of its first pixel, as a language model's prefill.

Both keep per-sequence state in arrays indexed by slot, compacted by the sampler when sequences leave. A guided
sequence has an unconditional twin, under the "any digit" label, with state of its own; the twins' logits follow
the sequences' in what `logits` returns. Plain numpy; the sampler runs the graphs in its executor through `run`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]
GraphFn = Callable[[Arrays], Arrays]  # named inputs -> named outputs, e.g. one ONNX Runtime session
Run = Callable[[GraphFn, Arrays], Awaitable[Arrays]]  # runs a graph off the event loop


@dataclass(frozen=True)
class StepInputs:
    """What the sampler knows of its b active sequences at one step; twins are those in `guided`."""

    image: np.ndarray  # (cap, 1, H, W) float32 pixel values drawn (or given) so far, by slot
    labels: np.ndarray  # (b,) int64
    any_label: int  # the twins' label
    rows: np.ndarray  # (b,) each sequence's row
    cols: np.ndarray  # (b,) and column
    fresh: np.ndarray  # (b,) bool: joined since the last step, no caches yet (it may start mid-image)
    guided: np.ndarray  # (g,) indices of the sequences with a twin

    @property
    def size(self) -> int:
        return self.labels.size


@dataclass(frozen=True)
class CacheGeometry:
    """The shapes of the cached activations: read from the step graphs' declared `vcache` (B, depth, channels,
    context, W) in the model's manifest."""

    depth: int  # layers whose outputs a later layer reads: all but the last
    channels: int  # width of each
    context: int  # p: rows above, and columns to the left, that each layer reads


def window_rows(image: np.ndarray, members: np.ndarray, first: np.ndarray, count: int, p: int) -> np.ndarray:
    """(m, 1, p+count, W): rows first-1-p .. first+count-2 of each member's image. Rows above the image repeat row
    0; the graph masks them."""
    index = np.maximum(first[:, None] - 1 - p + np.arange(p + count), 0)  # (m, p+count)
    return image[members[:, None], 0, index][:, None]


def window_cols(image: np.ndarray, members: np.ndarray, row: np.ndarray, first: np.ndarray, count: int,
                p: int) -> np.ndarray:
    """(m, 1, 1, p+count): columns first-1-p .. first+count-2 of one row of each member's image, masked likewise."""
    index = np.maximum(first[:, None] - 1 - p + np.arange(p + count), 0)  # (m, p+count)
    return image[members[:, None], 0, row[:, None], index][:, None, None]


class RowSteps:
    """vstack once per row on the rows above, hrow on each sequence's whole row per pixel.

    vstack answers every row it was given, (m, L, 2C, height, W), of which a sequence needs only its own: it runs
    on `chunk` sequences at a time, each chunk's own rows kept before the next runs, so that a step's vertical
    features never hold more than a chunk's full answer (all 28 rows of 128 sequences would be 180 MB for one
    row's worth, allocated and freed at every row)."""

    def __init__(self, vstack: GraphFn, hrow: GraphFn, chunk: int = 16) -> None:
        self.row_graph, self.pixel_graph, self.chunk = vstack, hrow, chunk
        self._vrow: np.ndarray | None = None  # (cap, L, 2C, 1, W) each sequence's vertical features on its row
        self._vrow_any: np.ndarray | None = None  # the same for its twin

    def compact(self, keep: np.ndarray) -> None:
        for array in (self._vrow, self._vrow_any):
            if array is not None:
                array[: keep.size] = array[keep]

    async def logits(self, s: StepInputs, run: Run, capacity: int) -> np.ndarray:
        b, side = s.size, s.image.shape[-1]
        ar = np.arange(b)
        starting = np.flatnonzero((s.cols == 0) | s.fresh)  # entering a row, or just joined (maybe mid-row)
        if starting.size:
            twins = np.intersect1d(starting, s.guided, assume_unique=True)
            height = int(s.rows[starting].max()) + 1  # rows > r never influence vfeats row r
            members = np.concatenate([starting, twins])
            labels = s.labels[members]
            labels[starting.size:] = s.any_label
            feeds = {"image": s.image[members, :, :height], "label": labels, "row": s.rows[members]}
            own = (await run(self._own_rows, feeds))["own"]  # (m, L, 2C, W): each one's own row
            if self._vrow is None or self._vrow_any is None:
                shape = (capacity, *own.shape[1:3], 1, side)
                self._vrow, self._vrow_any = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            self._vrow[starting, :, :, 0] = own[: starting.size]
            self._vrow_any[twins, :, :, 0] = own[starting.size:]
        assert self._vrow is not None and self._vrow_any is not None
        image_row = s.image[ar, :, s.rows][:, :, None, :]  # (b, 1, 1, W): each sequence's own row
        vrows = self._vrow[:b]  # a view: without twins the feed is not copied
        if s.guided.size:  # twins after the b sequences: the same rows, the "any digit" features
            image_row = np.concatenate([image_row, image_row[s.guided]])
            vrows = np.concatenate([vrows, self._vrow_any[s.guided]])
        logits = (await run(self.pixel_graph, {"image": image_row, "vfeats": vrows}))["logits"]
        cols = np.concatenate([s.cols, s.cols[s.guided]])
        return logits[np.arange(cols.size), :, 0, cols]  # (b + g, 256)

    def _own_rows(self, feeds: Arrays) -> Arrays:
        """vstack's features of each sequence's own row, `chunk` sequences per call (on the executor's thread)."""
        image, label, row = feeds["image"], feeds["label"], feeds["row"]
        parts = []
        for lo in range(0, label.size, self.chunk):
            hi = min(lo + self.chunk, label.size)
            vfeats = self.row_graph({"image": image[lo:hi], "label": label[lo:hi]})["vfeats"]  # (k, L, 2C, h, W)
            parts.append(vfeats[np.arange(hi - lo), :, :, row[lo:hi]])
        return {"own": np.concatenate(parts)}


class CachedSteps:
    """vstep once per row on that row alone, hstep on one position per pixel, every layer's activations cached.

    State arrays hold 2 * capacity entries: slot k's sequence at k, its twin at capacity + k, so that a step's
    members (sequences and twins together) are gathered and scattered with one index."""

    def __init__(self, vstep: GraphFn, hstep: GraphFn, geometry: CacheGeometry, side: int) -> None:
        self.row_graph, self.pixel_graph = vstep, hstep
        self.geometry, self.side = geometry, side
        self._state: dict[str, np.ndarray] = {}  # vrow, vcache, hcache: (2 * capacity, ...), allocated at first use
        self._capacity = 0

    def _allocate(self, capacity: int, layers: int, width: int) -> None:
        g, side = self.geometry, self.side
        shapes = {"vrow": (layers, width, 1, side), "vcache": (g.depth, g.channels, g.context, side),
                  "hcache": (g.depth, g.channels, 1, g.context)}
        self._state = {name: np.zeros((2 * capacity, *shape), np.float32) for name, shape in shapes.items()}
        self._capacity = capacity

    def zeros(self, batch: int, layers: int, width: int) -> tuple[Arrays, Arrays]:
        """(vstep feeds, hstep feeds) of zeros as a step gives them for `batch` sequences: one new row, one new
        column (`layers`, `width`: of the vertical features hstep takes, as the manifest declares them)."""
        g, side, p = self.geometry, self.side, self.geometry.context
        at = np.zeros(batch, np.int64)
        row = {"image": np.zeros((batch, 1, p + 1, side), np.float32),
               "vcache": np.zeros((batch, g.depth, g.channels, p, side), np.float32), "label": at, "row": at}
        pixel = {"image": np.zeros((batch, 1, 1, p + 1), np.float32),
                 "hcache": np.zeros((batch, g.depth, g.channels, 1, p), np.float32),
                 "vfeats": np.zeros((batch, layers, width, 1, 1), np.float32), "col": at}
        return row, pixel

    def check_against(self, vstack: GraphFn, hrow: GraphFn, tolerance: float = 1e-3) -> None:
        """Raise ValueError unless the step graphs compute what vstack and hrow do, on one random image: the first
        rows through vstep at once, then one whole row through hstep. A version's five graphs are one network
        only if they agree; graphs of another network would sample from a model its other graphs do not
        describe. It also runs the prefill shapes once, before the first completion does."""
        side, p = self.side, self.geometry.context
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (1, 1, side, side)).astype(np.float32)
        label, start, r = np.zeros(1, np.int64), np.zeros(1, np.int64), min(3, side - 1)
        want = vstack({"image": image, "label": label})["vfeats"]  # (1, L, 2C, H, W)
        g = self.geometry
        got = self.row_graph({"image": window_rows(image, start, start, r + 1, p), "label": label, "row": start,
                              "vcache": np.zeros((1, g.depth, g.channels, p, side), np.float32)})["vfeats"]
        problems = {"vstep": _difference(got, want[:, :, :, : r + 1])}
        vrow = np.ascontiguousarray(want[:, :, :, r: r + 1])
        want = hrow({"image": image[:, :, r: r + 1], "vfeats": vrow})["logits"]  # (1, 256, 1, W)
        got = self.pixel_graph({"image": window_cols(image, start, np.array([r]), start, side, p), "col": start,
                                "hcache": np.zeros((1, g.depth, g.channels, 1, p), np.float32), "vfeats": vrow})
        problems["hstep"] = _difference(got["logits"], want)
        if bad := {k: v for k, v in problems.items() if not v <= tolerance}:
            raise ValueError(f"the step graphs disagree with vstack and hrow: max abs difference "
                             f"{', '.join(f'{k} {v:.3g}' for k, v in bad.items())} (at most {tolerance:g})")

    def compact(self, keep: np.ndarray) -> None:
        cap = self._capacity
        for array in self._state.values():
            array[: keep.size] = array[keep]
            array[cap: cap + keep.size] = array[cap + keep]

    async def _vertical(self, s: StepInputs, run: Run, capacity: int, members: np.ndarray, at: np.ndarray,
                        twin: np.ndarray, first: np.ndarray, count: int) -> None:
        """Rows first .. first+count-1 through vstep for these members (`at`: their state entries; twin: which
        are twins), from the cache of the rows above them (none when first is 0): their vertical features on the
        last of those rows, and the cache of the rows above the next."""
        g, p = self.geometry, self.geometry.context
        labels = np.where(twin, s.any_label, s.labels[members])
        if self._state:
            vcache = self._state["vcache"][at]  # a copy
            vcache[first == 0] = 0.0  # a new sequence: whatever its slot held is not its own
        else:
            vcache = np.zeros((members.size, g.depth, g.channels, p, self.side), np.float32)
        feeds = {"image": window_rows(s.image, members, first, count, p), "vcache": vcache, "label": labels,
                 "row": first}
        out = await run(self.row_graph, feeds)
        vfeats, vnew = out["vfeats"], out["vnew"]
        if not self._state:
            self._allocate(capacity, vfeats.shape[1], vfeats.shape[2])
        self._state["vrow"][at] = vfeats[:, :, :, -1:]
        self._state["vcache"][at] = np.concatenate([vcache, vnew], axis=3)[:, :, :, -p:]

    async def logits(self, s: StepInputs, run: Run, capacity: int) -> np.ndarray:
        b, p = s.size, self.geometry.context
        # every sequence and twin as one list of members: the slot whose pixels it reads, and its state entry
        members = np.concatenate([np.arange(b), s.guided])
        twin = np.arange(members.size) >= b
        at = members + capacity * twin
        rows, cols = s.rows[members], s.cols[members]
        fresh = s.fresh[members]
        # a sequence entering a row steps that one row from its cache; one that just joined at row r steps rows
        # 0 .. r from nothing (a completion's prefill): one call per number of rows, usually just the one
        need = fresh | (cols == 0)
        if need.any():
            count, first = np.where(fresh, rows + 1, 1), np.where(fresh, 0, rows)
            for n in np.unique(count[need]):
                sel = need & (count == n)
                await self._vertical(s, run, capacity, members[sel], at[sel], twin[sel], first[sel], int(n))
        state = self._state
        hcache = state["hcache"][at]  # a copy
        mid_row = fresh & (cols > 0)  # joiners mid-row: the columns to their left, at once
        for width in np.unique(cols[mid_row]) if mid_row.any() else ():
            sel = np.flatnonzero(fresh & (cols == width))
            start = np.zeros(sel.size, np.int64)
            feeds = {"image": window_cols(s.image, members[sel], rows[sel], start, int(width), p),
                     "hcache": np.zeros_like(hcache[sel]), "vfeats": state["vrow"][at[sel], ..., :width],
                     "col": start}
            hnew = (await run(self.pixel_graph, feeds))["hnew"]
            hcache[sel] = np.concatenate([feeds["hcache"], hnew], axis=4)[..., -p:]
        vcol = state["vrow"][at, :, :, :, cols]  # (m, L, 2C, 1): each one's own column
        feeds = {"image": window_cols(s.image, members, rows, cols, 1, p), "hcache": hcache,
                 "vfeats": vcol[..., None], "col": cols}
        out = await run(self.pixel_graph, feeds)
        state["hcache"][at] = np.concatenate([hcache, out["hnew"]], axis=4)[..., -p:]
        return out["logits"][:, :, 0, 0]  # (b + g, 256)


def _difference(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference of two outputs, infinite when their shapes differ."""
    if got.shape != want.shape:
        return math.inf
    return float(np.abs(got.astype(np.float64) - want).max())
