"""Training loops for the four networks. Seeded, with progress bars, a loss curve and a sample grid per run,
and checkpoints that carry their constructor arguments and the resolved training config.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training import classifier as clf_lib
from training import gan as gan_lib
from training import pixelcnn as pcnn_lib
from training import vae as vae_lib
from training.config import ClassifierTrain, GANTrain, PixelCNNTrain, VAETrain
from training.data import Dataset
from training.evalutils import image_grid, save_png

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 28, 28) uint8 -> x (N, 1, 28, 28) float 0..255, y (N,) int64 (zeros when unlabeled)."""
    x = torch.from_numpy(ds.images.astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(ds.labels) if ds.labels is not None else torch.zeros(len(x), dtype=torch.int64)
    return x, y


def one_cycle(opt: torch.optim.Optimizer, peak_lr: float, steps: int):
    """Smith & Topin's one-cycle schedule: warm up to peak_lr, then anneal; stepped once per batch."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, peak_lr, total_steps=max(steps, 1))


def batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n - batch_size + 1, batch_size):  # drop the ragged last batch: stable BN statistics
        yield perm[i:i + batch_size]


def save_run(run_dir: Path, name: str, model: torch.nn.Module, model_cfg, train_cfg, history: dict,
             samples: torch.Tensor | None, seconds: float) -> Path:
    """Checkpoint (weights + constructor args + resolved config), history, loss curve and sample grid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / f"{name}.pt"
    torch.save({"model_args": model_cfg.to_dict(), "config": asdict(train_cfg), "state_dict": model.state_dict(),
                "history": history, "train_seconds": seconds}, ckpt)
    (run_dir / f"{name}_history.json").write_text(json.dumps(history, indent=1))
    _plot_losses(history, run_dir / f"{name}_loss.png", name)
    if samples is not None:
        imgs = samples.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()
        save_png(image_grid(imgs, nrow=10), run_dir / f"{name}_samples.png")
    return ckpt


def _plot_losses(history: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, values in history.items():
        if values and isinstance(values[0], int | float):
            ax.plot(np.arange(1, len(values) + 1), values, label=key)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train_classifier(train: Dataset, cfg: ClassifierTrain, run_dir: Path) -> clf_lib.DigitClassifier:
    gen = seed_everything(cfg.seed)
    x, y = tensors(train)
    model = clf_lib.DigitClassifier(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    sched = one_cycle(opt, cfg.lr, steps)
    history: dict[str, list] = {"train_loss": []}
    t0 = time.time()
    for _ in tqdm(range(cfg.epochs), desc="classifier", unit="epoch"):
        model.train()
        losses = []
        for idx in batches(len(x), cfg.batch_size, gen):
            loss = clf_lib.classifier_loss(model(clf_lib.random_shift(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history["train_loss"].append(float(np.mean(losses)))
    model.eval()
    save_run(run_dir, "classifier", model, cfg.model, cfg, history, None, time.time() - t0)
    return model


def train_pixelcnn(train: Dataset, cfg: PixelCNNTrain, run_dir: Path) -> pcnn_lib.PixelCNN:
    gen = seed_everything(cfg.seed)
    x, y = tensors(train)
    model = pcnn_lib.PixelCNN(cfg.model)
    any_digit = cfg.model.num_classes
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    sched = one_cycle(opt, cfg.lr, steps)
    history: dict[str, list] = {"train_bits_per_dim": []}
    t0 = time.time()
    bar = tqdm(total=steps, desc="pixelcnn", unit="step")
    for _ in range(cfg.epochs):
        model.train()
        losses = []
        for idx in batches(len(x), cfg.batch_size, gen):
            xb, yb = x[idx], y[idx].clone()
            if train.labels is None:
                yb.fill_(any_digit)
            else:  # label dropout: one network is both p(x | y) and p(x)
                yb[torch.rand(len(idx), generator=gen) < cfg.label_dropout] = any_digit
            loss = pcnn_lib.nll_bits_per_dim(model(xb, yb), xb)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(bpd=f"{loss.item():.3f}")
        history["train_bits_per_dim"].append(float(np.mean(losses)))
    bar.close()
    model.eval()
    samples = pcnn_lib.sample_fast(model, torch.arange(10).repeat_interleave(2) if train.labels is not None
                                   else torch.full((20,), any_digit), torch.rand(20, 784, generator=gen))
    save_run(run_dir, "pixelcnn", model, cfg.model, cfg, history, samples, time.time() - t0)
    return model


def train_vae(train: Dataset, cfg: VAETrain, run_dir: Path) -> vae_lib.VAE:
    gen = seed_everything(cfg.seed)
    x, _ = tensors(train)
    model = vae_lib.VAE(cfg.model)
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    sched = one_cycle(opt, cfg.lr, steps)
    history: dict[str, list] = {"train_neg_elbo_bits_per_dim": [], "kl_nats": []}
    t0 = time.time()
    step = 0
    for _ in tqdm(range(cfg.epochs), desc="vae", unit="epoch"):
        model.train()
        elbos, kls = [], []
        for idx in batches(len(x), cfg.batch_size, gen):
            _, rec, kl = vae_lib.negative_elbo(model, x[idx])
            warm = min(1.0, step / max(1, cfg.kl_warmup_epochs * (len(x) // cfg.batch_size)))
            loss = (rec + warm * kl).mean() / 784
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            elbos.append(vae_lib.bits_per_dim(rec + kl).mean().item())
            kls.append(kl.mean().item())
        history["train_neg_elbo_bits_per_dim"].append(float(np.mean(elbos)))
        history["kl_nats"].append(float(np.mean(kls)))
    model.eval()
    with torch.no_grad():
        loc, _ = model.decoder(torch.randn(100, cfg.model.latent_dim, generator=gen))
    save_run(run_dir, "vae", model, cfg.model, cfg, history, vae_lib.decode_to_pixels(loc), time.time() - t0)
    return model


def train_gan(train: Dataset, cfg: GANTrain, run_dir: Path) -> gan_lib.Generator:
    if train.labels is None:
        raise ValueError("the GAN is class-conditional: its training data needs labels")
    gen = seed_everything(cfg.seed)
    x, y = tensors(train)
    xs = x / 127.5 - 1.0
    g, d = gan_lib.Generator(cfg.model), gan_lib.Discriminator(cfg.model)
    opt_g = torch.optim.Adam(g.parameters(), cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(d.parameters(), cfg.lr, betas=cfg.betas)
    history: dict[str, list] = {"d_loss": [], "g_loss": []}
    t0 = time.time()
    for _ in tqdm(range(cfg.epochs), desc="gan", unit="epoch"):
        g.train()
        dl, gl = [], []
        for idx in batches(len(x), cfg.batch_size, gen):
            real, labels = xs[idx], y[idx]
            z = torch.randn(len(idx), cfg.model.z_dim, generator=gen)
            fake = g(z, labels)
            real_logit, real_classes = d(real, labels)
            fake_logit, _ = d(fake.detach(), labels)
            loss_d = (gan_lib.discriminator_loss(real_logit, fake_logit)
                      + cfg.class_loss_weight * gan_lib.class_loss(real_classes, labels))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            fake_logit, fake_classes = d(fake, labels)
            loss_g = (gan_lib.generator_loss(fake_logit)
                      + cfg.class_loss_weight * gan_lib.class_loss(fake_classes, labels))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            dl.append(loss_d.item())
            gl.append(loss_g.item())
        history["d_loss"].append(float(np.mean(dl)))
        history["g_loss"].append(float(np.mean(gl)))
    recalibrate_batchnorm(g, cfg.model, gen)
    g.eval()
    with torch.no_grad():
        samples = gan_lib.to_pixels(g(torch.randn(100, cfg.model.z_dim, generator=gen),
                                      torch.arange(10).repeat_interleave(10)))
    save_run(run_dir, "gan", g, cfg.model, cfg, history, samples, time.time() - t0)
    return g


@torch.no_grad()
def recalibrate_batchnorm(g: gan_lib.Generator, cfg, gen: torch.Generator, batches_: int = 50) -> None:
    """Replace the running BN statistics by exact averages over fresh samples, so that eval mode (which makes
    every image independent of its batch neighbours, as serving needs) matches what training saw."""
    for m in g.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    g.train()
    for _ in range(batches_):
        g(torch.randn(256, cfg.z_dim, generator=gen), torch.randint(0, cfg.num_classes, (256,), generator=gen))
    g.eval()
