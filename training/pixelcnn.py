"""Gated PixelCNN: architecture, loss and sampling (imports only torch).

van den Oord et al., 2016, "Conditional Image Generation with PixelCNN Decoders" (arXiv:1606.05328).
p(x) = prod_t p(x_t | x_<t, y), each factor a 256-way categorical over the raw 8-bit value.

Two stacks avoid the blind spot of the original masked PixelCNN. Instead of masks we use
shifted, padded convolutions, which keep causality visible in the shapes (k = 5, p = k // 2):

    vertical stack, kernel (p+1, k), padded p rows on top:   output row r sees input rows r-p..r
        x x x x x      <- rows r-2, r-1
        x x x x x
        x x o x x      <- row r (all columns)
      It is fed to the horizontal stack only after a one-row shift down, so pixel (r, c) receives
      information from rows < r only.

    horizontal stack, kernel (1, p+1), padded p columns on the left:
        x x o          <- columns c-2..c of row r; the first layer shifts one column right so the
                          current pixel itself is excluded ("mask A"), later layers include it ("mask B").

The model is split in two so that sampling can be fast (Ramachandran et al., 2017, "Fast Generation
for Convolutional Autoregressive Models" applied per row):
    vertical_features(x, y) -> what every horizontal layer receives from above, for every row
    horizontal(x, vfeats)   -> logits; every op in it has kernel height 1, so rows are independent
forward(x, y) == horizontal(x, vertical_features(x, y)), so the per-row fast path runs exactly the
ops of the full pass, only on fewer rows.

The cached path goes all the way (Ramachandran et al., 2017): each layer's activations are kept on the host and
a step computes only what new positions change.
    vertical_step(rows, vcache, y, row)    the vertical stack on n new rows, reading each layer's input on the
                                          p rows above them from vcache; returns their horizontal inputs and
                                          the new rows of every layer's output (the next vcache)
    horizontal_step(pixels, hcache, vfeats, col)
                                          the horizontal stack on n new columns of one row, reading each
                                          layer's input on the p columns to their left from hcache
With n = 1 a step is one row or one pixel; a larger n fills the caches of a given prefix in one call (completion).
Positions outside the image are masked in the step itself, so the caches need no reset.

Labels: y in 0..9 conditions on a digit; y == num_classes ("any digit") is the unconditional model,
trained by label dropout. Pixels enter as float values 0..255 (the graph normalises them). Every layer of
both stacks adds an embedding of the label (the paper's global conditioning); with `label_maps` M > 0 it
also adds a learned per-label spatial map (M channels, H x W, mixed to 2C channels per layer by a 1x1
convolution): where strokes of that digit lie, position by position (the paper's location-dependent
conditioning, with the map learned per label instead of computed from an embedding). The map never
depends on pixels, so causality is untouched; the horizontal stack receives it through the vertical
features, so a single row of it still needs no position of its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PixelCNNConfig:
    channels: int = 32       # C: width of both stacks
    n_layers: int = 7        # gated layers, the first one masked "A"
    kernel: int = 5          # k: odd kernel width
    head_channels: int = 96  # hidden width of the 1x1 output head
    num_classes: int = 10    # labels 0..9; label == num_classes means "unconditional"
    image_size: int = 28
    label_maps: int = 0      # M: channels of the per-label spatial maps (0: the label enters as an embedding only)

    def to_dict(self) -> dict:
        return asdict(self)


def gate(a: torch.Tensor) -> torch.Tensor:
    """(B, 2C, ...) -> (B, C, ...): tanh(a1) * sigmoid(a2), the gated activation unit."""
    a1, a2 = a.chunk(2, dim=1)
    return torch.tanh(a1) * torch.sigmoid(a2)


class GatedLayer(nn.Module):
    def __init__(self, c_in: int, c: int, k: int, num_labels: int, first: bool, label_maps: int = 0):
        super().__init__()
        p = k // 2
        self.p, self.first = p, first
        self.v_conv = nn.Conv2d(c_in, 2 * c, (p + 1, k))       # vertical: rows r-p..r
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_conv = nn.Conv2d(c_in, 2 * c, (1, p + 1))       # horizontal: cols c-p..c
        self.h_out = nn.Conv2d(c, c, 1)
        self.v_label = nn.Embedding(num_labels, 2 * c)
        self.h_label = nn.Embedding(num_labels, 2 * c)
        if label_maps:
            self.v_map = nn.Conv2d(label_maps, 2 * c, 1, bias=False)
            self.h_map = nn.Conv2d(label_maps, 2 * c, 1, bias=False)

    def vertical(self, v: torch.Tensor, y: torch.Tensor,
                 maps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """v (B, C_in, H, W), y (B,), maps (B, M, H, W) or None -> (next v (B, C, H, W), contribution to the
        horizontal stack (B, 2C, H, W))."""
        p = self.p
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))             # (B, 2C, H, W), row r sees rows <= r
        # shift down one row: row r of the horizontal stack must only see rows < r
        v_shift = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1, :]
        to_h = self.v_to_h(v_shift) + self.h_label(y)[:, :, None, None]
        v_cond = self.v_label(y)[:, :, None, None]
        if maps is not None:  # label only, no pixels: row r may see its own row of the map
            to_h = to_h + self.h_map(maps)
            v_cond = v_cond + self.v_map(maps)
        v_next = gate(v_pre + v_cond)
        return v_next, to_h

    def vertical_step(self, window: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, maps_above: torch.Tensor | None,
                      maps_here: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """window (B, C_in, p+n, W): this layer's input on rows r-1-p .. r+n-2 (zero above the image); keep
        (B, 1, n, 1): 0 where row r-1+j lies above the image -> (next v on rows r-1 .. r+n-2 (B, C, n, W),
        contribution to the horizontal stack on rows r .. r+n-1 (B, 2C, n, W)); as vertical() on those rows."""
        p = self.p
        v_pre = self.v_conv(F.pad(window, (p, p, 0, 0)))           # (B, 2C, n, W): rows r-1 .. r+n-2
        to_h = self.v_to_h(v_pre * keep) + self.h_label(y)[:, :, None, None]  # the shift: row r sees row r-1
        v_cond = self.v_label(y)[:, :, None, None]
        if maps_above is not None and maps_here is not None:
            to_h = to_h + self.h_map(maps_here)
            v_cond = v_cond + self.v_map(maps_above)
        return gate(v_pre + v_cond), to_h

    def horizontal_step(self, window: torch.Tensor, from_v: torch.Tensor) -> torch.Tensor:
        """window (B, C_in, 1, p+n): this layer's input on the p columns left of the n new ones and on those (the
        first layer: on columns c-p-1 .. c+n-2, never the new pixels themselves), zero outside the image;
        from_v (B, 2C, 1, n) -> (B, C, 1, n): this layer's output on the new columns, as horizontal() there."""
        out = self.h_out(gate(self.h_conv(window) + from_v))
        return out if self.first else window[:, :, :, self.p:] + out

    def horizontal(self, h: torch.Tensor, from_v: torch.Tensor) -> torch.Tensor:
        """h (B, C_in, H, W), from_v (B, 2C, H, W) -> (B, C, H, W). Kernel height 1: rows independent."""
        if self.first:  # mask A: shift right one column so pixel c never sees itself
            h_in = F.pad(h, (self.p + 1, 0, 0, 0))[:, :, :, :-1]
        else:
            h_in = F.pad(h, (self.p, 0, 0, 0))
        out = self.h_out(gate(self.h_conv(h_in) + from_v))
        return out if self.first else h + out                  # residual on all but the first layer


class PixelCNN(nn.Module):
    def __init__(self, cfg: PixelCNNConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.layers = nn.ModuleList(
            GatedLayer(1 if i == 0 else c, c, cfg.kernel, cfg.num_classes + 1, first=(i == 0),
                       label_maps=cfg.label_maps)
            for i in range(cfg.n_layers)
        )
        s = cfg.image_size
        self.label_map = (nn.Parameter(0.1 * torch.randn(cfg.num_classes + 1, cfg.label_maps, s, s))
                          if cfg.label_maps else None)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, cfg.head_channels, 1), nn.ReLU(),
                                  nn.Conv2d(cfg.head_channels, 256, 1))

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return x / 127.5 - 1.0                                  # 0..255 -> -1..1

    def vertical_features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) pixel values, y (B,) labels -> (B, L, 2C, H, W); row r depends on rows < r only.
        H may be fewer than image_size rows (the top ones): sampling feeds only the rows drawn so far."""
        v, feats = self.normalise(x), []
        maps = None if self.label_map is None else self.label_map[y][:, :, : x.shape[2]]  # (B, M, H, W)
        for layer in self.layers:
            v, to_h = layer.vertical(v, y, maps)
            feats.append(to_h)
        return torch.stack(feats, dim=1)

    def horizontal(self, x: torch.Tensor, vfeats: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W), vfeats (B, L, 2C, H, W) -> logits (B, 256, H, W)."""
        h = self.normalise(x)
        # unbind, not vfeats[:, i]: the backward of each select would zero-fill a whole (B, L, 2C, H, W)
        # gradient, a sixth of the training step; unbind's backward is one stack
        for layer, from_v in zip(self.layers, vfeats.unbind(1), strict=True):
            h = layer.horizontal(h, from_v)
        return self.head(h)

    def vertical_step(self, rows: torch.Tensor, vcache: torch.Tensor, y: torch.Tensor,
                      row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vertical stack on n new rows r .. r+n-1 from the cached rows above them.

        rows (B, 1, p+n, W): pixel values of rows r-1-p .. r+n-2; vcache (B, L-1, C, p, W): the outputs of layers
        0 .. L-2 on rows r-1-p .. r-2; y (B,) labels; row (B,) r. Rows above the image may hold anything.
        -> vfeats (B, L, 2C, n, W), rows r .. r+n-1 of vertical_features; vnew (B, L-1, C, n, W), the outputs of
        layers 0 .. L-2 on rows r-1 .. r+n-2, whose last p rows are the next step's vcache."""
        p, s = self.cfg.kernel // 2, self.cfg.image_size
        n = rows.shape[2] - p
        above = row[:, None] - 1 - p + torch.arange(p + n)                  # (B, p+n): the window's rows
        inside = (above >= 0).to(rows.dtype)[:, None, :, None]              # (B, 1, p+n, 1)
        out_rows = above[:, p:]                                             # (B, n): rows r-1 .. r+n-2
        keep = (out_rows >= 0).to(rows.dtype)[:, None, :, None]             # (B, 1, n, 1)
        maps_above = maps_here = None
        if self.label_map is not None:
            maps = self.label_map[y]                                        # (B, M, H, W)
            def rows_of(index: torch.Tensor) -> torch.Tensor:                # (B, n) -> (B, M, n, W)
                index = index.clamp(0, s - 1)[:, None, :, None]
                return torch.gather(maps, 2, index.expand(-1, maps.shape[1], -1, maps.shape[3]))
            maps_above, maps_here = rows_of(out_rows), rows_of(out_rows + 1)
        v, feats, news = self.normalise(rows) * inside, [], []
        for i, layer in enumerate(self.layers):
            v_next, to_h = layer.vertical_step(v, y, keep, maps_above, maps_here)
            feats.append(to_h)
            if i + 1 < len(self.layers):
                news.append(v_next)
                v = torch.cat([vcache[:, i], v_next], dim=2) * inside        # (B, C, p+n, W)
        return torch.stack(feats, dim=1), torch.stack(news, dim=1)

    def horizontal_step(self, pixels: torch.Tensor, hcache: torch.Tensor, vfeats: torch.Tensor,
                        col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The horizontal stack on n new columns c .. c+n-1 of one row from the cached columns to their left.

        pixels (B, 1, 1, p+n): pixel values of columns c-p-1 .. c+n-2 of the row; hcache (B, L-1, C, 1, p): the
        outputs of layers 0 .. L-2 on columns c-p .. c-1; vfeats (B, L, 2C, 1, n): the row's vertical features on
        the new columns; col (B,) c. Columns left of the image may hold anything.
        -> logits (B, 256, 1, n) as forward() gives them there; hnew (B, L-1, C, 1, n), the outputs of layers
        0 .. L-2 on the new columns, whose last p (with hcache) are the next step's hcache."""
        p = self.cfg.kernel // 2
        n = vfeats.shape[-1]
        left = col[:, None] - p + torch.arange(p + n)                       # (B, p+n): columns c-p .. c+n-1
        inside = (left >= 0).to(pixels.dtype)[:, None, None, :]             # (B, 1, 1, p+n)
        inside_first = (left - 1 >= 0).to(pixels.dtype)[:, None, None, :]   # the first layer's, one to the left
        h = self.layers[0].horizontal_step(self.normalise(pixels) * inside_first, vfeats[:, 0])
        news = [h]
        for i in range(1, len(self.layers)):
            window = torch.cat([hcache[:, i - 1], h], dim=3) * inside        # (B, C, 1, p+n)
            h = self.layers[i].horizontal_step(window, vfeats[:, i])
            if i + 1 < len(self.layers):
                news.append(h)
        return self.head(h), torch.stack(news, dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) float pixel values 0..255, y (B,) int64 -> logits (B, 256, H, W)."""
        return self.horizontal(x, self.vertical_features(x, y))


# --- loss ---------------------------------------------------------------------------------------

def log_prob_per_pixel(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits (B, 256, H, W), x (B, 1, H, W) values 0..255 -> log p(x_t | x_<t) in nats, (B, H, W)."""
    logp = F.log_softmax(logits, dim=1)
    return logp.gather(1, x.long()).squeeze(1)


def nll_bits_per_dim(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the batch in bits per dimension (the training loss)."""
    return -log_prob_per_pixel(logits, x).mean() / math.log(2.0)


# --- sampling -----------------------------------------------------------------------------------
# Randomness stays outside the model: the caller passes uniforms u (B, H*W) in [0, 1), one per pixel,
# and a pixel is drawn by inverting the categorical CDF. The same u give the same image, whichever
# path computes the logits and however the batch is composed.

def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (B, 256), u (B,) -> values (B,) int64, by inverse CDF of softmax(logits / temperature)."""
    probs = F.softmax(logits.double() / temperature, dim=1)   # float64: CDF ties stay rare
    cdf = probs.cumsum(dim=1)
    idx = (cdf < u[:, None].double() * cdf[:, -1:]).sum(dim=1)
    return idx.clamp(max=255)


@torch.no_grad()
def sample_naive(model: PixelCNN, y: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reference sampler: the whole image is recomputed for every pixel. y (B,), u (B, H*W) -> (B, 1, H, W)."""
    s = model.cfg.image_size
    x = torch.zeros(y.shape[0], 1, s, s)
    for t in range(s * s):
        r, c = divmod(t, s)
        logits = model(x, y)[:, :, r, c]
        x[:, 0, r, c] = sample_from_logits(logits, u[:, t], temperature).float()
    return x


@torch.no_grad()
def sample_fast(model: PixelCNN, y: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Row-cached sampler: the vertical stack runs once per row, the horizontal stack on one row per pixel.

    Same logits as sample_naive up to float rounding, about (H*W) / H fewer vertical passes.
    """
    s = model.cfg.image_size
    x = torch.zeros(y.shape[0], 1, s, s)
    for r in range(s):
        vrow = model.vertical_features(x, y)[:, :, :, r:r + 1]     # (B, L, 2C, 1, W): rows < r only
        for c in range(s):
            logits = model.horizontal(x[:, :, r:r + 1], vrow)[:, :, 0, c]
            x[:, 0, r, c] = sample_from_logits(logits, u[:, r * s + c], temperature).float()
    return x


@torch.no_grad()
def sample_cached(model: PixelCNN, y: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Activation-cached sampler: one vertical_step per row, one horizontal_step per pixel, each on the new
    positions only. Same logits as sample_naive up to float rounding. y (B,), u (B, H*W) -> (B, 1, H, W)."""
    cfg, p = model.cfg, model.cfg.kernel // 2
    s, b, depth, c_ = cfg.image_size, y.shape[0], cfg.n_layers - 1, cfg.channels
    x = torch.zeros(b, 1, s, s)
    padded = F.pad(x, (p + 1, 0, p + 1, 0))                   # room for the windows above and to the left
    vcache = torch.zeros(b, depth, c_, p, s)
    for r in range(s):
        rows = padded[:, :, r:r + p + 1, p + 1:]                # rows r-1-p .. r-1
        vfeats, vnew = model.vertical_step(rows, vcache, y, torch.full((b,), r))
        vcache = torch.cat([vcache, vnew], dim=3)[:, :, :, -p:]
        hcache = torch.zeros(b, depth, c_, 1, p)
        for c in range(s):
            pixels = padded[:, :, p + 1 + r:p + 2 + r, c:c + p + 1]  # columns c-p-1 .. c-1 of row r
            logits, hnew = model.horizontal_step(pixels, hcache, vfeats[..., c:c + 1], torch.full((b,), c))
            hcache = torch.cat([hcache, hnew], dim=4)[..., -p:]
            value = sample_from_logits(logits[:, :, 0, 0], u[:, r * s + c], temperature).float()
            x[:, 0, r, c] = padded[:, 0, p + 1 + r, p + 1 + c] = value
    return x
