"""Render the held-out metrics of a model store as Markdown (the README's tables come from here).

    python -m training.report [models_store]
"""

from __future__ import annotations

import sys
from pathlib import Path

from service.store import discover, read_manifest


def _f(x, digits=3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def render(store: Path) -> str:
    manifests = [read_manifest(v) for v in discover(store)]  # sorted by model and version
    ms = {m.name: m for m in manifests}  # the newest version of each model
    pixelcnns = [m for m in manifests if m.name == "pixelcnn"]
    lines = []
    if (pc := ms.get("pixelcnn")) is not None:
        m = pc.metrics
        lines += ["| held-out (500 digits) | bits/dim |", "|---|---|"]
        for v in pixelcnns:
            tag = f" v{v.version}" if len(pixelcnns) > 1 else ""
            bold = "**" if v is pc else ""
            lines += [f"| PixelCNN{tag}, exact NLL, log p(x) | {bold}{_f(v.metrics['heldout_bits_per_dim'])}{bold} |",
                      f"| PixelCNN{tag} given the digit label, log p(x given y) | "
                      f"{_f(v.metrics['heldout_bits_per_dim_given_label'])} |"]
        if (vae := ms.get("vae")) is not None:
            lines += [f"| VAE, importance-weighted bound (k = {vae.metrics['iwae_samples']}) | "
                      f"{_f(vae.metrics['heldout_iwae_bits_per_dim'])} |",
                      f"| VAE, negative ELBO | {_f(vae.metrics['heldout_neg_elbo_bits_per_dim'])} |"]
        lines += [f"| PNG (Pillow, optimize) | {_f(m['codec_bits_per_dim']['png'])} |",
                  f"| WebP lossless (Pillow, method 6) | {_f(m['codec_bits_per_dim']['webp_lossless'])} |", ""]
    if (gan := ms.get("gan")) is not None:
        m = gan.metrics
        judge = m["judge"]
        lines += ["| GAN and judge | value |", "|---|---|",
                  f"| judge classifier, held-out accuracy | {_f(judge['classifier']['heldout_accuracy'])} |",
                  f"| conditional samples classified as their label ({m['conditional_samples']} samples) | "
                  f"**{_f(m['conditional_accuracy'])}** |",
                  f"| worst label | {min(m['conditional_accuracy_per_label'].values()):.3f} |",
                  f"| unconditional samples, class histogram (500) | {m['unconditional_class_histogram']} |",
                  f"| Frechet distance to held-out, GAN samples | {_f(m['frechet_distance_samples'], 2)} |"]
        if (vae := ms.get("vae")) is not None:
            fd = vae.metrics['frechet_distance_samples']
            lines += [f"| Frechet distance to held-out, VAE samples | {_f(fd, 2)} |"]
        lines += [f"| Frechet distance to held-out, real training digits (floor) | "
                  f"{_f(judge['frechet_real_train_vs_heldout'], 2)} |", ""]
    if (vae := ms.get("vae")) is not None:
        lines += ["| VAE edit (strengths -2..+2) | Spearman per image (mean) | Spearman, pooled change | "
                  "measured std per unit strength | digit kept |", "|---|---|---|---|---|"]
        for name, e in vae.metrics["attribute_edits"]["attributes"].items():
            lines.append(f"| {name} | **{_f(e['spearman_mean_per_image'])}** | {_f(e['spearman_pooled_change'])} | "
                         f"{_f(e['measured_std_per_unit_strength'])} | {_f(e['class_kept_rate'])} |")
        mse, mae = vae.metrics["reconstruction_mse"], vae.metrics["reconstruction_mae"]
        lines += ["", f"VAE reconstruction error (held-out, pixel units): MSE {_f(mse, 1)}, MAE {_f(mae, 2)}.", ""]
    judged = [v for v in pixelcnns if "guidance" in v.metrics]
    if judged:
        lines += guidance_table(judged) + [""]
    judged = [v for v in pixelcnns if "anomaly" in v.metrics]
    if judged:
        lines += anomaly_table(judged) + [""] + completion_table(judged) + [""]
    lines += ["| model | version | training time (s) | files |", "|---|---|---|---|"]
    for m in manifests:
        size = sum(f.bytes for f in m.files.values())
        lines.append(f"| {m.name} | {m.version} | {m.training['train_seconds']:.0f} | {size / 1e6:.2f} MB |")
    return "\n".join(lines)


def guidance_table(versions) -> list[str]:
    """Per guidance weight, for each PixelCNN version: the share of conditional samples the judge recognised as
    their label, its mean confidence in that label, and the class-wise Frechet distance (training.guidance)."""
    rows = {v.version: {r["guidance"]: r for r in v.metrics["guidance"]["rows"]} for v in versions}
    weights = sorted({w for by_weight in rows.values() for w in by_weight})
    n = {v.metrics["guidance"]["per_label"] * 10 for v in versions}
    head = "| guidance w | " + " | ".join(f"v{v.version}: recognised | v{v.version}: confidence | "
                                         f"v{v.version}: class-wise Fréchet" for v in versions) + " |"
    lines = [f"PixelCNN samples judged per guidance weight ({'/'.join(map(str, sorted(n)))} conditional samples, "
             "equally many per digit, the same seeded uniforms for every weight; `python -m training guidance`):",
             "",
             head, "|---|" + "---|---|---|" * len(versions)]
    for w in weights:
        cells = []
        for v in versions:
            r = rows[v.version].get(w)
            cells += ["" if r is None else f"{r['recognised']:.1%}", "" if r is None else f"{r['confidence']:.3f}",
                      "" if r is None else f"{r['classwise_frechet']:.0f}"]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    return lines


def anomaly_table(versions) -> list[str]:
    """Per outlier set, for each PixelCNN version: the AUROC of the anomaly score and of raw -log p(x) against the
    evaluation half of the held-out digits, and the share flagged at the default alpha (training.anomaly)."""
    reports = {v.version: v.metrics["anomaly"] for v in versions}
    first = next(iter(reports.values()))
    alpha = first["alpha"]
    head = "| against held-out digits | images | " + " | ".join(
        f"v{v}: AUROC, score | v{v}: AUROC, -log p(x) | v{v}: flagged at alpha = {alpha:g}" for v in reports) + " |"
    lines = [f"PixelCNN anomaly scores (the evaluation half of the held-out split, {first['evaluation_size']} digits, "
             f"against each set; `python -m training anomaly`):", "", head, "|---|---|" + "---|---|---|" * len(reports)]
    for i, row in enumerate(first["sets"]):
        cells = []
        for r in reports.values():
            s = r["sets"][i]
            cells += [f"{s['auroc_score']:.3f}", f"{s['auroc_neg_logprob']:.3f}", f"{s['flagged']:.1%}"]
        lines.append(f"| {row['set']} | {row['images']} | " + " | ".join(cells) + " |")
    cells = []
    for r in reports.values():
        cells += ["", "", f"{r['heldout_flagged']:.1%}"]
    lines.append(f"| the held-out digits themselves | {first['evaluation_size']} | " + " | ".join(cells) + " |")
    return lines


def completion_table(versions) -> list[str]:
    """Per condition, for each PixelCNN version: the share of held-out digits, their top rows given and the rest
    drawn, that the judge labels as the original digit (training.anomaly)."""
    reports = {v.version: v.metrics["completion"] for v in versions}
    first = next(iter(reports.values()))
    lines = [f"Completions of the {first['digits']} held-out digits from their top {first['known_rows']} rows, one "
             "each, recognised by the judge as the original digit:", "",
             "| condition | " + " | ".join(f"v{v}" for v in reports) + " |", "|---|" + "---|" * len(reports)]
    for i, row in enumerate(first["rows"]):
        lines.append(f"| {row['condition']} | " + " | ".join(f"{r['rows'][i]['recognised']:.1%}"
                                                              for r in reports.values()) + " |")
    return lines


if __name__ == "__main__":
    print(render(Path(sys.argv[1] if len(sys.argv) > 1 else "models_store")))
