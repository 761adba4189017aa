"""The server's split training on a GPU, against centralized training of the unsplit model.

Rows, side by side in one run, on synthetic CIFAR-shaped data (random 32x32 uint8 images resized
to the model's input and normalized, 10 classes), SFL-V1, 8-bit activations and gradients, SGD
lr 0.05 momentum 0.9, bf16 autocast on CUDA as the server uses it:

- centralized: the unsplit model, forward, cross-entropy, backward, optimizer step;
- split, sequential: ``SplitTrainer.step`` for every device in turn;
- split, step_many: the same batches, one ``SplitTrainer.step_many`` call per step for all devices
  (n/a where the trainer has no ``step_many`` yet);
- two ranks: one trainer per GPU, each training half of the devices' copies, the server copies
  averaged at round end by a weighted all-reduce (needs 2 GPUs).

The device half (patch embedding forward, 8-bit quantization) runs in-process before the timed
rounds and its backward not at all: every figure is the server's throughput. A round is
``--steps`` steps of every device then ``finish_round``; both are timed, ``begin_round`` is not.

    .venv/bin/python benchmarks/bench_gpu.py [--device auto|cpu|cuda] [--preset P] [--batch B]
        [--devices N] [--steps S] [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import server_runtime.trainer as trainer_module
from edge_runtime.quantize import QuantizedTensor
from server_runtime.checkpoint import create_model
from server_runtime.presets import PresetError, get_preset
from server_runtime.quantize_torch import quantize_torch
from server_runtime.trainer import OptimizerSpec, SplitTrainer, StepError, pick_device, use_bf16

NUM_CLASSES, BITS, SEED = 10, 8, 0
CIFAR_SIDE = 32  # the synthetic images' side before resizing to the model's input
POOL = 4  # distinct batches, reused round-robin (random data: their content does not matter)
WARMUP_ROUNDS, WORLD = 1, 2
DEFAULTS = {"preset": "vit_base_patch32_224", "batch": 128, "devices": 10, "steps": 3, "rounds": 2}
QUICK = {"preset": "vit_quick_patch4_16", "batch": 8, "devices": 3, "steps": 2, "rounds": 1}
COUNT_FLAGS = ("batch", "devices", "steps", "rounds")

Upload = tuple[QuantizedTensor, np.ndarray]  # what a device sends per step: activations, labels
Plan = dict[str, list[Upload]]  # device id -> its upload at each step of a round
Batch = tuple[torch.Tensor, torch.Tensor]  # normalized images and labels on the compute device
Stepper = Callable[[SplitTrainer, list[str], Plan, int], None]
Finisher = Callable[[SplitTrainer, dict], None]


class BenchError(RuntimeError):
    """A configuration that could not be measured (a refused step, a failed rank)."""


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does; ``rounds`` are the timed ones, after one warm-up round."""

    preset: str
    batch: int
    devices: int
    steps: int
    rounds: int

    @property
    def samples_per_round(self) -> int:
        """Samples the server trains on in one round, over all devices."""
        return self.devices * self.steps * self.batch


@dataclass(frozen=True)
class Row:
    """One configuration's result: samples/s, or a note saying why there is none."""

    name: str
    samples_per_s: float | None
    peak_gib: float | None = None
    note: str = ""
    failed: bool = False


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the previous configuration left on the GPU and restart its peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since :func:`release`, in GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_ids(count: int) -> list[str]:
    """The simulated devices' ids."""
    return [f"dev-{i}" for i in range(count)]


def synthetic_pool(preset: str, batch: int, device: torch.device, count: int) -> list[Batch]:
    """``count`` batches of random CIFAR-shaped images, resized and normalized for ``preset``, with labels."""
    config = get_preset(preset)
    generator = torch.Generator().manual_seed(SEED)
    mean = torch.tensor(config.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=device).view(1, -1, 1, 1)
    pool = []
    for _ in range(count):
        shape = (batch, config.in_chans, CIFAR_SIDE, CIFAR_SIDE)
        raw = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        images = F.interpolate(raw.to(device, torch.float32) / 255, size=(config.img_size, config.img_size),
                               mode="bilinear", align_corners=False)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        pool.append(((images - mean) / std, labels.to(device)))
    return pool


@torch.no_grad()
def device_uploads(trainer: SplitTrainer, pool: Sequence[Batch]) -> list[Upload]:
    """What devices send for each pool batch: the device half's tokens quantized to 8 bits, and the labels."""
    generator = torch.Generator(device=trainer.device).manual_seed(SEED)
    return [(quantize_torch(trainer.halves.device(images), BITS, generator=generator), labels.cpu().numpy())
            for images, labels in pool]


def upload_plan(uploads: Sequence[Upload], settings: Settings) -> Plan:
    """Which upload each device sends at each step of a round: the same in every round and rank."""
    return {device_id: [uploads[(i * settings.steps + step) % len(uploads)] for step in range(settings.steps)]
            for i, device_id in enumerate(device_ids(settings.devices))}


def build_trainer(settings: Settings, device: torch.device) -> SplitTrainer:
    """A fresh SFL-V1 trainer from the seeded preset, as the server builds it."""
    model = create_model(settings.preset, num_classes=NUM_CLASSES, seed=SEED)
    return SplitTrainer(model, mode="v1", optimizer=OptimizerSpec(), device=device, bf16=use_bf16("auto", device))


def run_centralized(settings: Settings, device: torch.device) -> float:
    """Samples/s of the unsplit model trained in one loop on the same batches and optimizer."""
    pool = synthetic_pool(settings.preset, settings.batch, device, min(POOL, settings.devices * settings.steps))
    model = create_model(settings.preset, num_classes=NUM_CLASSES, seed=SEED).to(device).train()
    optimizer = OptimizerSpec().build(model.parameters())
    bf16 = use_bf16("auto", device)

    def step(index: int) -> None:
        images, labels = pool[index % len(pool)]
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    per_round = settings.devices * settings.steps
    for index in range(per_round * WARMUP_ROUNDS):
        step(index)
    sync(device)
    start = time.perf_counter()
    for index in range(per_round * settings.rounds):
        step(index)
    sync(device)
    return settings.rounds * settings.samples_per_round / (time.perf_counter() - start)


def step_sequential(trainer: SplitTrainer, ids: list[str], plan: Plan, step: int) -> None:
    """One step of every device in turn through ``SplitTrainer.step``."""
    for device_id in ids:
        activations, labels = plan[device_id][step]
        trainer.step(device_id, activations, labels, gradient_bits=BITS)


def has_step_many() -> bool:
    """Whether the trainer offers batched steps (``StepRequest`` and ``SplitTrainer.step_many``)."""
    return hasattr(trainer_module, "StepRequest") and hasattr(SplitTrainer, "step_many")


def step_batched(trainer: SplitTrainer, ids: list[str], plan: Plan, step: int) -> None:
    """One step of every device in one ``SplitTrainer.step_many`` call; a refused request is an error."""
    requests = []
    for device_id in ids:
        activations, labels = plan[device_id][step]
        requests.append(trainer_module.StepRequest(device_id, activations, labels, gradient_bits=BITS))
    results = trainer.step_many(requests)
    refused = [f"{r.device_id}: {res}" for r, res in zip(requests, results) if isinstance(res, StepError)]
    if refused:
        raise BenchError("step_many refused " + "; ".join(refused))


def finish_local(trainer: SplitTrainer, updates: dict) -> None:
    """The server's own round end: FedAvg of the device uploads and of the server copies."""
    trainer.finish_round(updates)


def run_round(trainer: SplitTrainer, ids: list[str], plan: Plan, settings: Settings,
              stepper: Stepper, finisher: Finisher) -> float:
    """One round: begin (not timed), then every device's steps and the round's end (timed); seconds."""
    trainer.begin_round(ids)
    weights = trainer.device_weights()  # devices upload the global device part unchanged
    updates = {device_id: (weights, settings.steps * settings.batch) for device_id in ids}
    sync(trainer.device)
    start = time.perf_counter()
    for step in range(settings.steps):
        stepper(trainer, ids, plan, step)
    finisher(trainer, updates)
    sync(trainer.device)
    return time.perf_counter() - start


def timed_rounds(trainer: SplitTrainer, ids: list[str], plan: Plan, settings: Settings,
                 stepper: Stepper, finisher: Finisher) -> float:
    """Seconds of the timed rounds, after the warm-up round(s)."""
    for _ in range(WARMUP_ROUNDS):
        run_round(trainer, ids, plan, settings, stepper, finisher)
    return sum(run_round(trainer, ids, plan, settings, stepper, finisher) for _ in range(settings.rounds))


def plan_for(trainer: SplitTrainer, settings: Settings) -> Plan:
    """The devices' uploads for ``trainer``'s model, computed in-process on its compute device."""
    pool = synthetic_pool(settings.preset, settings.batch, trainer.device, min(POOL, settings.devices * settings.steps))
    return upload_plan(device_uploads(trainer, pool), settings)


def run_split(settings: Settings, device: torch.device, stepper: Stepper) -> float:
    """Samples/s of the server training every device's copy on one compute device."""
    trainer = build_trainer(settings, device)
    seconds = timed_rounds(trainer, device_ids(settings.devices), plan_for(trainer, settings), settings, stepper,
                           finish_local)
    return settings.rounds * settings.samples_per_round / seconds


# -- two trainer ranks, one per GPU ------------------------------------------------------------------


def finish_allreduce(trainer: SplitTrainer, updates: dict, all_ids: Sequence[str]) -> None:
    """Round end across ranks, as the daemon's ranks do it (``SplitTrainer.finish_round`` with
    ``reduce``): each rank adds (n_k / n) x its own server copies, rank 0 also the device uploads,
    and one float64 all-reduce (SUM) gives every rank the FedAvg."""
    def reduce(vector: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(vector, op=dist.ReduceOp.SUM)
        return vector

    samples = next(iter(updates.values()))[1]  # every device trains the same number of samples
    rank0 = dist.get_rank() == 0
    uploads = {d: (updates[next(iter(updates))][0], samples) for d in all_ids} if rank0 else {}
    trainer.finish_round(uploads, counts={d: samples for d in all_ids}, reduce=reduce, coordinator=rank0)


@dataclass(frozen=True)
class RankReport:
    """What one trainer rank measured, and a checksum of its server part after the last round."""

    seconds: float
    peak_gib: float | None
    checksum: float


def server_checksum(trainer: SplitTrainer) -> float:
    """Sum of squares of the global server part (float64): equal on every rank after the all-reduce."""
    return float(sum(p.detach().double().square().sum() for p in trainer.halves.server.parameters()))


def rank_main(rank: int, settings: Settings, port: int, queue, device_type: str = "cuda") -> None:
    """One trainer rank (GPU ``rank`` over NCCL; on CPU over gloo, for tests) training its share of
    the devices; puts a :class:`RankReport` on ``queue``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=WORLD)
    try:
        trainer = build_trainer(settings, device)
        plan = plan_for(trainer, settings)
        ids = device_ids(settings.devices)[rank::WORLD]
        finisher = functools.partial(finish_allreduce, all_ids=device_ids(settings.devices))
        dist.barrier()
        seconds = timed_rounds(trainer, ids, plan, settings, step_sequential, finisher)
        queue.put(RankReport(seconds, peak_gib(device), server_checksum(trainer)))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for the ranks' rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(settings: Settings, device_type: str = "cuda") -> list[RankReport]:
    """Run :func:`rank_main` in ``WORLD`` spawned processes; a failed rank raises
    ``ProcessRaisedException`` or ``ProcessExitedException`` (the other ranks are terminated)."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(settings, free_port(), queue, device_type), nprocs=WORLD, join=True)
    return [queue.get() for _ in range(WORLD)]


def run_two_ranks(settings: Settings, device: torch.device) -> Row:
    """Two trainer ranks, one per GPU; samples/s over both (the slower rank's time)."""
    name, found = "two ranks", torch.cuda.device_count()
    if found < WORLD:
        return Row(name, None, note=f"skipped (needs {WORLD} GPUs, found {found})")
    if device.type != "cuda":
        return Row(name, None, note=f"skipped (--device {device.type})")
    if settings.devices < WORLD:
        return Row(name, None, note=f"skipped (needs >= {WORLD} devices, got {settings.devices})")
    try:
        reports = spawn_ranks(settings)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        if "OutOfMemoryError" in str(exc):
            return Row(name, None, note=oom_note(settings), failed=True)
        return Row(name, None, note=f"failed: a rank raised:\n{exc}", failed=True)
    if len({report.checksum for report in reports}) != 1:
        return Row(name, None, note="failed: the ranks' server parts differ after the all-reduce", failed=True)
    seconds = max(report.seconds for report in reports)
    peak = max(report.peak_gib or 0.0 for report in reports)
    return Row(name, settings.rounds * settings.samples_per_round / seconds, peak)


# -- the run ---------------------------------------------------------------------------------------


def oom_note(settings: Settings) -> str:
    """What to print when a configuration runs out of GPU memory."""
    smaller = max(1, settings.batch // 2)
    return f"out of GPU memory at batch {settings.batch}: try a smaller --batch (e.g. --batch {smaller})"


def measure(name: str, settings: Settings, device: torch.device, run: Callable[[], float]) -> Row:
    """One single-device configuration's row; running out of GPU memory or a refused step is a failed
    row, not a crash."""
    release(device)
    note = ""
    try:
        return Row(name, run(), peak_gib(device))
    except torch.cuda.OutOfMemoryError:
        note = oom_note(settings)
    except BenchError as exc:
        note = f"failed: {exc}"
    release(device)  # after the except block, which held the failed run's tensors
    return Row(name, None, note=note, failed=True)


def measure_all(settings: Settings, device: torch.device) -> list[Row]:
    """Every configuration, one after the other on the same compute device."""
    rows = [measure("centralized", settings, device, lambda: run_centralized(settings, device)),
            measure("split, sequential step", settings, device, lambda: run_split(settings, device, step_sequential))]
    if has_step_many():
        rows.append(measure("split, step_many", settings, device, lambda: run_split(settings, device, step_batched)))
    else:
        rows.append(Row("split, step_many", None, note="n/a (step_many not available)"))
    release(device)
    rows.append(run_two_ranks(settings, device))
    return rows


def print_header(settings: Settings, device: torch.device) -> None:
    """What was run, on what."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)"
    print(f"bench_gpu: {settings.preset}, batch {settings.batch}, {settings.devices} devices x {settings.steps} "
          f"steps per round, {WARMUP_ROUNDS} warm-up + {settings.rounds} timed rounds, SFL-V1, "
          f"{BITS}-bit activations and gradients")
    print(f"compute device: {device}, GPU: {gpu}, GPUs visible: {torch.cuda.device_count()}, "
          f"torch {torch.__version__}, bf16 autocast {'on' if use_bf16('auto', device) else 'off'}")
    print("the device half (patch embedding forward, 8-bit quantization) is computed in-process before the timed "
          "rounds and its backward is not run: the figures are the server's throughput")
    print("a round times every device's steps and finish_round; begin_round (a server copy per device) is not timed")


def print_rows(rows: Sequence[Row]) -> None:
    """The table: samples/s and the ratio to centralized training, peak GPU memory per row."""
    base = rows[0].samples_per_s
    print(f"\n{'configuration':<26} {'samples/s':>10} {'vs centralized':>15} {'peak GiB':>9}")
    for row in rows:
        if row.samples_per_s is None:
            print(f"{row.name}: {row.note}")
            continue
        ratio = f"{row.samples_per_s / base:.3f}" if base else "n/a"
        peak = "n/a" if row.peak_gib is None else f"{row.peak_gib:.2f}"
        print(f"{row.name:<26} {row.samples_per_s:>10.1f} {ratio:>15} {peak:>9}")
    peaks = [row.peak_gib for row in rows if row.peak_gib is not None]
    print(f"peak GPU memory: {max(peaks):.2f} GiB" if peaks else "peak GPU memory: n/a (no GPU used)")


def parse_settings(argv: Sequence[str] | None) -> tuple[Settings, str]:
    """Settings and the compute device name from the command line; ``--quick`` changes the defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="compute device (auto: CUDA when present)")
    parser.add_argument("--preset", help=f"ViT preset (default {DEFAULTS['preset']})")
    for flag in COUNT_FLAGS:
        parser.add_argument(f"--{flag}", type=int, help=f"default {DEFAULTS[flag]}, {QUICK[flag]} with --quick")
    parser.add_argument("--quick", action="store_true", help=f"a tiny smoke run: {QUICK}")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    values = {key: base[key] if getattr(args, key) is None else getattr(args, key) for key in DEFAULTS}
    problems = [f"--{key} must be >= 1, got {values[key]}" for key in COUNT_FLAGS if values[key] < 1]
    try:
        get_preset(values["preset"])
    except PresetError as exc:
        problems.append(str(exc))
    if problems:
        parser.error("; ".join(problems))
    return Settings(**values), args.device


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration and print the table; 1 if one failed (out of memory, a failed rank)."""
    settings, device_name = parse_settings(argv)
    try:
        device = pick_device(device_name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_header(settings, device)
    rows = measure_all(settings, device)
    print_rows(rows)
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
