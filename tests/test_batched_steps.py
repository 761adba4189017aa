"""Batched server steps (torch.func vmap over stacked V1 copies), the seeded gradient noise, and the
FedAvg-through-a-reduce path of ``finish_round``: each equal to what it replaces.

The CUDA tests (batched steps on a GPU in fp32 and bf16, the NCCL reduce over two GPUs) skip on a
machine without CUDA; ``scripts/gpu_check.sh`` runs them where there is one.
"""

from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pytest
import torch

from edge_runtime.quantize import dequantize
from server_runtime.checkpoint import create_model
from server_runtime.quantize_torch import quantize_torch
from server_runtime.trainer import OptimizerSpec, SplitTrainer, StepError, StepRequest, step_generator

PRESET = "vit_quick_patch4_16"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def twins(mode: str = "v1", optimizer: str = "sgd", device: str = "cpu", bf16: bool = False,
          devices: int = 6) -> tuple[SplitTrainer, SplitTrainer, list[str]]:
    """Two trainers from the same model, each with a round begun for the same devices."""
    model = create_model(PRESET, num_classes=10, seed=3)
    spec = OptimizerSpec(optimizer, 0.05, 0.9, 1e-4)
    a, b = (SplitTrainer(copy.deepcopy(model), mode, spec, device, bf16) for _ in range(2))
    ids = [f"dev-{i}" for i in range(devices)]
    a.begin_round(ids)
    b.begin_round(ids)
    return a, b, ids


def requests(trainer: SplitTrainer, ids: list[str], rng: np.random.Generator, step: int, bits: int = 8,
             batch: int = 8) -> list[StepRequest]:
    tokens, dim = trainer.tokens_shape
    out = []
    for device_id in ids:
        x = torch.from_numpy(rng.standard_normal((batch, tokens, dim), dtype=np.float32))
        out.append(StepRequest(device_id, quantize_torch(x, 8, generator=torch.Generator().manual_seed(step)),
                               rng.integers(0, 10, batch), bits, "tensor", step_generator(0, 1, device_id, step)))
    return out


def assert_same_training(a: SplitTrainer, b: SplitTrainer, ids: list[str], rng: np.random.Generator, steps: int,
                         tol: float) -> None:
    """Sequential steps on ``a``, batched on ``b``: every loss, gradient code and parameter within ``tol``."""
    for step in range(steps):
        batch = requests(a, ids, rng, step)
        sequential = [a.step(r.device_id, r.activations, r.labels, r.gradient_bits, r.per,
                             step_generator(0, 1, r.device_id, step)) for r in batch]
        batched = b.step_many(batch)
        for one, many in zip(sequential, batched):
            assert many.loss == pytest.approx(one.loss, rel=tol, abs=tol)
            if tol <= 1e-5:
                assert_same_gradient(many.gradient, one.gradient)
            else:
                np.testing.assert_allclose(dequantize(many.gradient), dequantize(one.gradient), rtol=tol, atol=tol)
    for device_id in ids:
        for (name, pa), pb in zip(a.copies[device_id].part.named_parameters(), b.copies[device_id].part.parameters()):
            np.testing.assert_allclose(pb.detach().float().cpu().numpy(), pa.detach().float().cpu().numpy(),
                                       rtol=tol, atol=tol, err_msg=name)


def assert_same_gradient(got, want) -> None:
    """Equal within 1e-5 (float32), or (quantized) codes equal but on at most 0.1 % of elements one level off."""
    g, w = dequantize(got), dequantize(want)
    if got.bits == 32:
        np.testing.assert_allclose(g, w, atol=1e-5)
        return
    level = float(np.max(np.asarray(want.hi) - np.asarray(want.lo))) / (2**want.bits - 1)
    off = np.abs(g - w) > 1e-7
    assert off.mean() <= 1e-3 and np.abs(g - w).max() <= level * 1.001


@pytest.mark.parametrize("bits", [32, 8])
def test_batched_v1_steps_equal_sequential_steps(bits: int) -> None:
    # Prepare: six devices' copies twice; Execute: three steps each, one by one vs as one batch
    a, b, ids = twins()
    rng = np.random.default_rng(0)
    for step in range(3):
        batch = requests(a, ids, rng, step, bits)
        sequential = [a.step(r.device_id, r.activations, r.labels, bits, r.per, step_generator(0, 1, r.device_id, step))
                      for r in batch]
        batched = b.step_many(batch)
        # Assert: losses and float32 gradients agree within 1e-5; 8-bit gradients draw the same noise,
        # so their codes agree but for values within float32 noise of a level boundary (one level apart)
        for one, many in zip(sequential, batched):
            assert many.loss == pytest.approx(one.loss, abs=1e-5)
            assert_same_gradient(many.gradient, one.gradient)
            assert many.server_time_s > 0
    for device_id in ids:
        for (name, pa), pb in zip(a.copies[device_id].part.named_parameters(), b.copies[device_id].part.parameters()):
            np.testing.assert_allclose(pb.detach().numpy(), pa.detach().numpy(), atol=1e-5, err_msg=name)
        assert a.copies[device_id].losses == pytest.approx(b.copies[device_id].losses, abs=1e-5)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(a.copies["dev-0"].part.parameters(),
                                                             a.halves.server.parameters()))
    assert moved > 1e-4  # the copies really trained


def test_step_many_refuses_bad_batches_alone_and_groups_by_shape() -> None:
    a, b, ids = twins(devices=4)
    rng = np.random.default_rng(1)
    batch = requests(a, ids[:2], rng, 0) + requests(a, ids[2:3], rng, 0, batch=4)
    bad_labels = StepRequest("dev-3", batch[0].activations, np.full(8, 99), 8)
    stranger = StepRequest("nobody", batch[0].activations, batch[0].labels, 8)
    results = b.step_many([*batch, bad_labels, stranger])
    assert [type(r).__name__ for r in results] == ["StepResult"] * 3 + ["StepError", "StepError"]
    assert "labels must be integers" in str(results[3]) and "not training in this round" in str(results[4])
    sequential = [a.step(r.device_id, r.activations, r.labels, 8, r.per, r.generator) for r in batch]
    for one, many in zip(sequential, results):
        assert many.loss == pytest.approx(one.loss, abs=1e-5)


def test_v2_steps_stay_sequential_on_the_shared_copy() -> None:
    a, b, ids = twins(mode="v2", devices=3)
    rng = np.random.default_rng(2)
    batch = requests(a, ids, rng, 0)
    sequential = [a.step(r.device_id, r.activations, r.labels, 8, r.per, r.generator) for r in batch]
    for one, many in zip(sequential, b.step_many(requests(b, ids, np.random.default_rng(2), 0))):
        assert many.loss == one.loss  # bit for bit: the same steps in the same order
    assert len(b.shared.losses) == 3


def test_gradient_noise_depends_on_the_step_not_on_who_serves_it() -> None:
    x = torch.randn(4, 16, 64)
    codes = [quantize_torch(x, 4, generator=step_generator(7, 3, "dev-1", 2)).payload for _ in range(2)]
    assert codes[0] == codes[1]
    others = {quantize_torch(x, 4, generator=step_generator(*key)).payload
              for key in [(8, 3, "dev-1", 2), (7, 4, "dev-1", 2), (7, 3, "dev-2", 2), (7, 3, "dev-1", 3)]}
    assert codes[0] not in others and len(others) == 4


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_fedavg_through_a_reduce_equals_the_one_trainer_fedavg(mode: str) -> None:
    # Prepare: the same trained round on two trainers
    a, b, ids = twins(mode=mode, devices=3)
    rng = np.random.default_rng(4)
    for step in range(2):
        for trainer in (a, b):
            for r in requests(trainer, ids, np.random.default_rng(step), step):
                trainer.step(r.device_id, r.activations, r.labels, 32)
    uploads = {d: ({k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in a.device_weights().items()},
                   10 + 5 * i) for i, d in enumerate(ids)}
    # Execute: one trainer's FedAvg; the other's through a reduce of one rank (the identity)
    a.finish_round(uploads)
    b.finish_round(uploads, reduce=lambda vector: vector.clone())
    for name, value in a.state_dict().items():
        np.testing.assert_allclose(b.state_dict()[name].numpy(), value.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    assert not b.copies


def test_finish_round_of_a_worker_adds_only_its_copies() -> None:
    a, b, ids = twins(devices=2)
    b.begin_round(ids[:1])  # b holds dev-0's copy only, as a worker rank would
    counts = {"dev-0": 10, "dev-1": 30}
    seen = []
    b.finish_round({}, counts=counts, reduce=lambda v: seen.append(v.clone()) or v, coordinator=False)
    device_keys = set(b.device_module.state_dict())
    float_state = {k: v for k, v in a.model.state_dict().items() if v.is_floating_point()}
    offset = 0
    for name, value in float_state.items():
        piece = seen[0][offset:offset + value.numel()].reshape(value.shape)
        expected = torch.zeros_like(value) if name in device_keys else value.double() * 0.25
        torch.testing.assert_close(piece, expected.double(), rtol=1e-6, atol=1e-7, msg=name)
        offset += value.numel()


# -- CUDA --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_cuda_batched_v1_steps_equal_sequential_steps() -> None:
    a, b, ids = twins(device="cuda")
    assert_same_training(a, b, ids, np.random.default_rng(5), 3, 1e-5)


@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_batched_steps_track_sequential_bf16_steps() -> None:
    a, b, ids = twins(device="cuda", bf16=True)
    assert_same_training(a, b, ids, np.random.default_rng(6), 2, 2e-2)


def _nccl_rank(rank: int, port: int, queue) -> None:
    from server_runtime.ranks import RankGroup, RankLaunch

    torch.cuda.set_device(rank)
    group = RankGroup(RankLaunch(rank, 2, "127.0.0.1", port, rank), "nccl")
    total = group.reduce_sum(torch.full((5,), float(rank + 1), dtype=torch.float64))
    queue.put((rank, total.tolist()))
    group.close()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_reduce_over_two_gpus() -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    mp.start_processes(_nccl_rank, args=(port, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get(timeout=60) for _ in range(2))
    assert results == {0: [3.0] * 5, 1: [3.0] * 5}


def test_a_bad_request_is_a_step_error() -> None:
    a, _, ids = twins(devices=1)
    with pytest.raises(StepError):
        a.step("dev-0", quantize_torch(torch.zeros(2, 3, 4), 8), np.zeros(2, dtype=np.int64), 8)
