"""Fine-tuning from a pre-trained backbone against training from scratch, through `sflam simulate`.

    python benchmarks/finetune.py                # pre-train (~4 min), then 6 runs of ~5 min, one at a time
    python benchmarks/finetune.py --quick        # a smoke test: 2 rounds, seeds 0 and 1

No pretrained weights can be downloaded here, so the backbone is made by this script, the way a
published one is: ``vit_mini_patch4_32`` in timm's ``global_pool="avg"`` + ``fc_norm`` layout,
trained centrally on digits classes 0-4 (the training part of digits' seeded 80/20 split), then
saved **headless** (no ``head.*``, what timm writes for ``num_classes=0``). The fine-tuning task
is the other five classes, 5-9, written as an image folder (``train/`` and ``test/`` from the
same split, so no pre-training image is in it). Each seed runs `sflam simulate --dataset
folder:... --checkpoint backbone.safetensors` (a fresh zero-initialized 5-class head, the
pooling layout read from the file's keys) and the same run from scratch (``--global-pool avg``:
the same layout, timm's init), one at a time. Reported per cell: rounds until the test accuracy
first reaches --target, and the final accuracy, as mean +- 95 % t interval over the seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from experiments import ROOT, _plt, _save, band, cell, fmt, run_all, seeded

PRESET = "vit_mini_patch4_32"
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
SPLIT_SEED = 0  # digits' train/test split (server_runtime.data.load_dataset's stratified 80/20)


def pretrain(out: Path, epochs: int, seed: int = 0) -> tuple[Path, float]:
    """Train the backbone centrally on classes 0-4; save it headless. Returns (file, test accuracy)."""
    import torch
    import torch.nn.functional as F

    from edge_runtime.data import Preprocess, preprocess
    from server_runtime.checkpoint import create_model, save_checkpoint
    from server_runtime.data import load_dataset

    path = out / "backbone.safetensors"
    info = out / "backbone.json"
    if path.is_file() and info.is_file() and json.loads(info.read_text()).get("epochs") == epochs:
        return path, json.loads(info.read_text())["test_accuracy"]  # --out reused
    data = load_dataset("digits", seed=SPLIT_SEED)
    train, test = (_classes(s, PRETRAIN_CLASSES) for s in (data.train, data.test))
    torch.manual_seed(seed)
    model = create_model(PRESET, num_classes=len(PRETRAIN_CLASSES), layout={"global_pool": "avg"}, seed=seed)
    spec = Preprocess(model.config.img_size, model.config.mean, model.config.std)
    x_train, x_test = (torch.from_numpy(preprocess(s.images, spec)) for s in (train, test))
    y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    steps_per_epoch = -(-len(x_train) // 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * steps_per_epoch)
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    for epoch in range(epochs):
        model.train()
        for batch in np.array_split(rng.permutation(len(x_train)), steps_per_epoch):
            images = _shift(x_train[batch], rng, 4)  # so the backbone does not learn positions by heart
            loss = F.cross_entropy(model(images), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"  pre-train epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    save_checkpoint(model, path, headless=True)
    info.write_text(json.dumps({"epochs": epochs, "test_accuracy": accuracy, "train_images": len(x_train),
                                "classes": list(PRETRAIN_CLASSES), "layout": model.config.layout}))
    return path, accuracy


def _classes(data, classes: tuple[int, ...]):
    """The images of ``classes``, relabelled 0..len-1."""
    from server_runtime.data import ImageSet

    subset = data.subset(np.flatnonzero(np.isin(data.labels, classes)))
    labels = np.searchsorted(np.asarray(classes), subset.labels)  # classes are sorted
    return ImageSet(subset.images, labels.astype(np.int64), tuple(str(c) for c in classes))


def _shift(images, rng: np.random.Generator, pixels: int):
    """The batch translated by up to ``pixels`` in x and y (zero padded): a random crop."""
    import torch.nn.functional as F

    padded = F.pad(images, (pixels,) * 4)
    size = images.shape[-1]
    dx, dy = rng.integers(0, 2 * pixels + 1, size=2)
    return padded[..., dy:dy + size, dx:dx + size]


def write_task(out: Path) -> Path:
    """Digits classes 5-9 as ``<dir>/train/<digit>/*.png`` and ``<dir>/test/<digit>/*.png``."""
    from PIL import Image

    from server_runtime.data import load_dataset

    folder = out / "digits-5-9"
    if (folder / "done").is_file():
        return folder
    data = load_dataset("digits", seed=SPLIT_SEED)
    for part, images in (("train", data.train), ("test", data.test)):
        for index in np.flatnonzero(np.isin(images.labels, FINETUNE_CLASSES)):
            target = folder / part / str(int(images.labels[index]))
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images.images[index]).save(target / f"{index:04d}.png")
    (folder / "done").write_text("")
    return folder


def rounds_to(summary: dict, target: float) -> float:
    """The first round whose test accuracy reaches ``target`` (nan: never)."""
    for round_, accuracy in zip(summary["accuracy_rounds"], summary["accuracy_per_round"]):
        if accuracy >= target:
            return float(round_)
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune", help="run directories")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="where the PNG goes")
    parser.add_argument("--seeds", default="0,1,2", help="every cell runs once per seed (default 0,1,2)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per run (default 40)")
    parser.add_argument("--local-epochs", type=int, default=5, help="local epochs per round (default 5, the demo's)")
    parser.add_argument("--pretrain-epochs", type=int, default=60, help="central pre-training epochs (default 60)")
    parser.add_argument("--target", type=float, default=0.85, help="accuracy for 'rounds to' (default 0.85)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 pre-training epochs, seeds 0 and 1")
    args = parser.parse_args(argv)
    seeds = [0, 1] if args.quick else [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.rounds, args.pretrain_epochs = 2, 2
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"pre-training {PRESET} (avg pooling, fc_norm) on digits classes 0-4, {args.pretrain_epochs} epochs")
    backbone, accuracy = pretrain(args.out, args.pretrain_epochs)
    print(f"  backbone: {backbone.name}, headless; test accuracy on classes 0-4 {accuracy:.2%}")
    task = write_task(args.out)
    common = ["--model", PRESET, "--dataset", f"folder:{task}", "--rounds", str(args.rounds),
              "--local-epochs", str(args.local_epochs), "--bits", "8", "--no-emulate-link"]
    cells = [("finetune", [*common, "--checkpoint", str(backbone)]), ("scratch", [*common, "--global-pool", "avg"])]
    jobs = seeded(cells, seeds)
    print(f"{len(jobs)} runs of {args.rounds} rounds on digits classes 5-9 (seeds {seeds}), one at a time")
    results = run_all(jobs, args.out, 1)
    print(f"\nmean +- 95 % interval over seeds {seeds}; accuracy on the 5-class test set in percent")
    print(f"{'start':<10} {f'rounds to {args.target:.0%}':>16} {'acc. round 1':>13} {'acc. round 5':>13}"
          f" {'final acc.':>12} {'never reached':>14}")
    for name, _ in cells:
        runs = cell(results, name, seeds)
        reached = [rounds_to(s, args.target) for s in runs]
        at = (lambda k: fmt([s["accuracy_per_round"][min(k, len(s["accuracy_per_round"])) - 1] for s in runs]))
        print(f"{name:<10} {fmt(reached, 1, 1):>16} {at(1):>13} {at(5):>13}"
              f" {fmt([s['final_accuracy'] for s in runs]):>12} {sum(r != r for r in reached):>14}")
    diffs = [rounds_to(f, args.target) - rounds_to(s, args.target)
             for f, s in zip(cell(results, "finetune", seeds), cell(results, "scratch", seeds))]
    print(f"rounds to {args.target:.0%}, fine-tuned minus scratch, seed by seed: {fmt(diffs, 1, 1)}")
    gains = [f["final_accuracy"] - s["final_accuracy"]
             for f, s in zip(cell(results, "finetune", seeds), cell(results, "scratch", seeds))]
    print(f"final accuracy, fine-tuned minus scratch, seed by seed: {fmt(gains)} points")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, label in (("finetune", "from the headless backbone"), ("scratch", "from scratch")):
        band(ax, cell(results, name, seeds), label)
    ax.axhline(100 * args.target, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="round", ylabel="test accuracy [%]", title="digits 5-9, vit_mini_patch4_32", ylim=(0, 100))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    _save(fig, args.out / "results_finetune.png" if args.quick else args.img / "results_finetune.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
