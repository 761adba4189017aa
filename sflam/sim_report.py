"""What a simulation measured: ``summary.json``, the plots and the result table.

Two kinds of figures, kept apart because they answer different questions:

- **measured**, from the daemon's ``metrics.jsonl``: accuracy, the bytes that crossed the broker,
  the devices' reported compute and (emulated) uplink time and energy, the server's step time and
  the downlink time. On one machine every device's compute runs on the same CPU, so measured
  compute time is this host's, not the profile's.
- **modeled**, by the allocator's system model (docs/allocator.md) on the run's own scenario
  (``scenario.json``: each device's profile, channel and sample count): the round latency and the
  device energy the scheme costs on the hardware and radios it emulates. Every scheme is scored by
  the same model, which is what makes the comparison across schemes fair.

``bytes_up_fp32`` is what the uplink would have carried with float32 activations: the measured
bytes plus, per device and round, (32 - q) / 8 bytes for every activation value sent at q bits.
``bytes_down_fp32`` is the same for the downlink: (32 - g) / 8 bytes more per gradient value sent at
g bits, and 2 bytes more per device weight of every float16 broadcast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server_runtime.metrics import read_round_records
from server_runtime.round_record import DeviceRoundRecord, RoundRecord

SUMMARY_KEYS = ("final_accuracy", "last5_accuracy", "best_on_validation", "rounds", "bytes_up", "bytes_down",
                "bytes_up_fp32", "bytes_down_fp32", "device_energy_j", "mean_round_latency_s", "scheme")
PHASES = ("compute", "uplink", "server", "downlink")


def read_records(path: Path) -> list[RoundRecord]:
    """The round records of a metrics.jsonl (missing file: none; a torn last line is skipped)."""
    try:
        return read_round_records(path, strict=False)
    except FileNotFoundError:
        return []


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _options(opts: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(opts):
        data = dataclasses.asdict(opts)
        data["profiles"] = list(data.get("profiles", ()))
        return data
    return dict(opts)


def summarize(opts: Any, records: Sequence[RoundRecord], out: Path, *, wall_s: float,
              status: str = "completed") -> dict[str, Any]:
    """The run's summary (see the module docstring for measured vs modeled)."""
    options = _options(opts)
    scheme = options["scheme"]
    turns = options["per_round"] if scheme == "sl" else 1
    counted = [r for r in records if r.counted]
    groups = [counted[i:i + turns] for i in range(0, len(counted) - turns + 1, turns)]
    accuracy = [(k + 1, g[-1].accuracy) for k, g in enumerate(groups) if g[-1].accuracy is not None]
    traffic = _traffic(records, options)
    per_round = [_round_breakdown(g) for g in groups]
    modeled = _modeled(out, scheme, groups, options)
    latencies = [sum(_num(r.phases_s.train) for r in g) for g in groups]
    summary: dict[str, Any] = {
        "scheme": scheme,
        "trainers": options.get("trainers", 1),
        "bits": options["bits"] if scheme == "sflam" else 32,
        "status": status,
        "rounds": len(groups),
        "final_accuracy": accuracy[-1][1] if accuracy else None,
        "last5_accuracy": float(np.mean([a for _, a in accuracy[-5:]])) if accuracy else None,
        "best_on_validation": _best_on_validation(groups),
        "accuracy_per_round": [a for _, a in accuracy],
        "accuracy_rounds": [k for k, _ in accuracy],
        **traffic,
        "mean_round_latency_s": float(np.mean(latencies)) if latencies else None,
        "latency_breakdown_s": {p: float(np.mean([b[p] for b in per_round])) if per_round else None for p in PHASES},
        "per_round": {
            "latency_s": latencies,
            "bytes_up": [sum(f.bytes_up for r in g for f in r.devices.values()) for g in groups],
            "energy_j": [sum(_num(f.energy_j) for r in g for f in r.devices.values()) for g in groups],
            **{f"{p}_s": [b[p] for b in per_round] for p in PHASES},
        },
        "modeled": modeled,
        "attempts": len(records),
        "failed_attempts": len(records) - len(counted),
        "wall_s": wall_s,
        "options": options,
    }
    return summary


def _traffic(records: Sequence[RoundRecord], options: Mapping[str, Any]) -> dict[str, Any]:
    """Bytes each way, measured and as float32 (module docstring), and the devices' reported energy:
    every attempt's traffic and energy was spent, counted or not."""
    scheme, elements = options["scheme"], _elements_per_sample(options["model"])
    # a float16 broadcast (--model-bits 16) carries 2 bytes fewer per device weight than float32
    broadcast_saved = _device_weight_values(options["model"]) * 2 if options.get("model_bits", 32) == 16 else 0
    up = down = 0
    extra_up = extra_down = energy = 0.0
    for record in records:
        down += record.bytes_broadcast
        extra_down += broadcast_saved
        for figures in record.devices.values():
            up, down, energy = up + figures.bytes_up, down + figures.bytes_down, energy + _num(figures.energy_j)
            values = _activation_values(figures, elements, options)  # one gradient value per activation value
            bits_up, bits_down = figures.allocation.bits_up, figures.allocation.bits_down
            if scheme in ("sflam", "sfl") and bits_up < 32:
                extra_up += values * (32 - bits_up) / 8.0
            if scheme != "fl" and bits_down < 32:
                extra_down += values * (32 - bits_down) / 8.0
    return {"bytes_up": up, "bytes_down": down, "bytes_up_fp32": int(round(up + extra_up)),
            "bytes_down_fp32": int(round(down + extra_down)), "device_energy_j": energy}


def _best_on_validation(groups: Sequence[Sequence[RoundRecord]]) -> dict[str, Any] | None:
    """The round with the highest validation accuracy (the earliest of ties) and its test accuracy:
    the run's "best" figure, chosen without looking at the test set; None without a validation set."""
    scored = [(k + 1, g[-1]) for k, g in enumerate(groups) if g[-1].validation_accuracy is not None]
    if not scored:
        return None
    round_, record = max(scored, key=lambda item: (item[1].validation_accuracy, -item[0]))
    return {"round": round_, "validation_accuracy": record.validation_accuracy, "test_accuracy": record.accuracy}


def _elements_per_sample(model: str) -> int:
    from allocator.scenario import model_shape

    return int(model_shape(model).elements_per_sample)


def _device_weight_values(model: str) -> int:
    from allocator.scenario import model_shape

    return int(model_shape(model).device_weight_bits) // 32


def _activation_values(figures: DeviceRoundRecord, elements: int, options: Mapping[str, Any]) -> float:
    """Activation values a device sent in a round: its steps x batch x values per sample (upper bound
    on the last partial batch, so the fp32 figure is, if anything, slightly high)."""
    return figures.steps * options["batch_size"] * elements


def _phase_times(figures: DeviceRoundRecord) -> dict[str, float]:
    """A device's seconds per phase of PHASES (0 for what it did not report)."""
    return {"compute": _num(figures.compute_time_s), "uplink": _num(figures.uplink_time_s),
            "server": figures.server_time_s, "downlink": figures.downlink_time_s}


def _round_breakdown(group: Sequence[RoundRecord]) -> dict[str, float]:
    """Per phase, the mean over the round's devices (summed over an SL round's turns)."""
    totals = dict.fromkeys(PHASES, 0.0)
    for record in group:
        times = [_phase_times(f) for d, f in record.devices.items() if d in record.completed]
        for phase in PHASES:
            if times:
                totals[phase] += float(np.mean([t[phase] for t in times]))
    return totals


def _modeled(out: Path, scheme: str, groups: Sequence[Sequence[RoundRecord]],
             options: Mapping[str, Any]) -> dict[str, Any]:
    """The system model's round latency and device energy for each counted round of the scheme."""
    path = Path(out) / "scenario.json"
    if not path.is_file() or not groups:
        return {"round_latency_s": None, "energy_j": None, "per_round_latency_s": [], "per_round_energy_j": []}
    if scheme == "sflam" and options["bits"] == "auto" and not options.get("emulate_link", True):
        # the allocator calibrated each channel from loopback uplinks (docs/allocator.md), so the powers
        # and bandwidths it chose are for links far faster than the scenario's radios: evaluated on
        # those radios they would mean nothing
        return {"round_latency_s": None, "energy_j": None, "per_round_latency_s": [], "per_round_energy_j": [],
                "note": "not modeled: bits auto without --emulate-link calibrates the allocator on loopback links"}
    problem = load_problem(out)
    latency, energy = [], []
    for group in groups:
        ids = [d for record in group for d in record.selected]
        lat, en = modeled_round(problem, scheme, ids, group, options["model"])
        latency.append(lat)
        energy.append(en)
    return {"round_latency_s": float(np.mean(latency)), "energy_j": float(np.mean(energy)),
            "per_round_latency_s": latency, "per_round_energy_j": energy,
            "note": "allocator system model on scenario.json: the emulated hardware and radios"}


def load_problem(out: Path) -> Any:
    """The run's scenario (``out/scenario.json``) as an allocator Problem."""
    from allocator.scenario import load_scenario

    return load_scenario(Path(out) / "scenario.json")


def subset(problem: Any, ids: Sequence[str]) -> Any:
    """The problem restricted to the devices ``ids`` (in that order)."""
    fleet = problem.fleet
    index = [fleet.ids.index(d) for d in ids]
    arrays = {f.name: getattr(fleet, f.name)[index] for f in dataclasses.fields(fleet)
              if isinstance(getattr(fleet, f.name), np.ndarray)}
    sub = dataclasses.replace(fleet, ids=tuple(ids), profiles=tuple(fleet.profiles[k] for k in index), **arrays)
    return dataclasses.replace(problem, fleet=sub, subchannel_gain=None)


def modeled_round(problem: Any, scheme: str, ids: Sequence[str], group: Sequence[RoundRecord],
                  model: str) -> tuple[float, float]:
    """(round latency s, device energy J) of one round of ``scheme`` by the system model."""
    from allocator.baselines import fl, fp32_sfl, sequential_sl
    from allocator.scenario import full_model_macs_per_sample, full_model_params, model_shape
    from allocator.system import evaluate

    if scheme == "sl":  # turns one after another (a device may take more than one turn)
        turns = [sequential_sl(subset(problem, [d])).evaluation for d in ids]
        return float(sum(t.round_latency_s for t in turns)), float(sum(np.sum(t.energy_j) for t in turns))
    sub = subset(problem, ids)
    if scheme == "sflam":
        allocs = {d: f.allocation for r in group for d, f in r.devices.items()}
        alloc = allocation_vectors([allocs[d] for d in ids])
        down = alloc.bits_down
        # the gradient bits the server chose, fixed or allocated, are the ones the model is to score
        params = dataclasses.replace(sub.params, allowed_bits_down=tuple(sorted(set(down.tolist()))))
        ev = evaluate(dataclasses.replace(sub, params=params), alloc)
    elif scheme == "sfl":
        ev = fp32_sfl(sub).evaluation
    else:
        shape = model_shape(model)
        ratio = full_model_macs_per_sample(shape) / shape.device_macs_per_sample
        ev = fl(sub, ratio, 32.0 * full_model_params(shape)).evaluation
    return float(ev.round_latency_s), float(np.sum(ev.energy_j))


def allocation_vectors(allocations: Sequence[Any]) -> Any:
    """The allocator's AllocationVectors of round-record allocations (AllocationRecord), in order."""
    from allocator.system import AllocationVectors

    return AllocationVectors(np.array([int(a.bits_up) for a in allocations], dtype=np.int64),
                             np.array([float(a.tx_power_w) for a in allocations]),
                             np.array([float(a.bandwidth_hz) for a in allocations]),
                             bits_down=np.array([int(a.bits_down) for a in allocations], dtype=np.int64))


def uplink_check(out: Path, records: Sequence[RoundRecord],
                 walls: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Kernel links: each completed device's measured uplink airtime in each counted round (what its
    shaped interface carried, at the allocation's rate) against the system model's uplink time for
    that allocation, and the wall time of its activation publishes (``walls``: device -> plan round
    -> seconds, from the devices' exit summaries). ``max_relative_error``: the largest
    |measured / modeled - 1|."""
    from allocator.system import uplink_time_s

    problem = load_problem(out)
    rows = []
    for record in records:
        ids = [d for d in record.completed if record.devices[d].uplink_time_s is not None]
        if not record.counted or not ids:
            continue
        modeled = uplink_time_s(subset(problem, ids), allocation_vectors([record.devices[d].allocation for d in ids]))
        for d, model in zip(ids, modeled):
            measured = float(record.devices[d].uplink_time_s)
            wall = (walls or {}).get(d, {}).get(str(record.plan_round))
            rows.append({"round": record.round, "device": d, "measured_s": round(measured, 4),
                         "modeled_s": round(float(model), 4), "ratio": round(measured / float(model), 4),
                         "publish_wall_s": wall})
    errors = [abs(r["ratio"] - 1.0) for r in rows]
    return {"rows": rows, "max_relative_error": max(errors) if errors else None,
            "note": "measured: 8 x bytes the shaped interface carried / the allocation's rate (headers, "
                    "acknowledgements and retransmissions included); modeled: the system model's uplink "
                    "bits / Shannon rate; publish_wall_s: first byte to PUBACK of the round's activation "
                    "messages (airtime plus a round trip and TCP ramp-up per step)"}


def write_summary(summary: Mapping[str, Any], out: Path) -> Path:
    """``summary.json``, written atomically."""
    path = Path(out) / "summary.json"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".summary-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1, allow_nan=False, default=_nan_to_none)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# table and plots


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _ratio(part: float, whole: float | None) -> str:
    return f"{part / whole:.3f}" if whole else "-"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g} s"


def _joule(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g} J"


def _best_text(summary: Mapping[str, Any]) -> str:
    best = summary.get("best_on_validation")
    return "-" if not best else f"{_pct(best['test_accuracy'])} (round {best['round']})"


def render_table(summary: Mapping[str, Any]) -> str:
    """One scheme's result table."""
    return render_comparison([summary])


def render_comparison(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A column per run: accuracy, traffic, energy and latency, measured and modeled."""
    rows = [
        ("scheme", lambda s: f"{s['scheme']}" + (f" (q={s['bits']})" if s["scheme"] == "sflam" else "")),
        ("rounds", lambda s: str(s["rounds"])),
        ("final accuracy", lambda s: _pct(s["final_accuracy"])),
        ("last-5-round mean accuracy", lambda s: _pct(s.get("last5_accuracy"))),
        ("test acc. at best validation", _best_text),
        ("bytes up", lambda s: _mb(s["bytes_up"])),
        ("bytes up if fp32", lambda s: _mb(s["bytes_up_fp32"])),
        ("up / fp32", lambda s: _ratio(s["bytes_up"], s["bytes_up_fp32"])),
        ("bytes down", lambda s: _mb(s["bytes_down"])),
        ("bytes down if fp32", lambda s: _mb(s.get("bytes_down_fp32"))),
        ("down / fp32", lambda s: _ratio(s["bytes_down"], s.get("bytes_down_fp32"))),
        ("total / fp32", lambda s: _ratio(s["bytes_up"] + s["bytes_down"],
                                          s["bytes_up_fp32"] + s.get("bytes_down_fp32", s["bytes_down"]))),
        ("device energy (reported)", lambda s: _joule(s["device_energy_j"])),
        ("round latency (measured)", lambda s: _sec(s["mean_round_latency_s"])),
        ("  compute/uplink/server/down", lambda s: "/".join(
            "-" if s["latency_breakdown_s"][p] is None else f"{s['latency_breakdown_s'][p]:.2g}" for p in PHASES)),
        ("round latency (model)", lambda s: _sec(s["modeled"]["round_latency_s"])),
        ("energy / round (model)", lambda s: _joule(s["modeled"]["energy_j"])),
        ("wall time", lambda s: _sec(s["wall_s"])),
    ]
    width = max(len(name) for name, _ in rows) + 2
    cols = [[fmt(s) for _, fmt in rows] for s in summaries]
    col_width = max(14, *(len(c) for col in cols for c in col)) + 2
    lines = []
    for i, (name, _) in enumerate(rows):
        lines.append(f"{name:<{width}}" + "".join(f"{col[i]:>{col_width}}" for col in cols))
        if i == 0:
            lines.append("-" * (width + col_width * len(cols)))
    return "\n".join(lines)


def plot_run(summary: Mapping[str, Any], records: Sequence[RoundRecord], out: Path) -> list[Path]:
    """accuracy.png, bytes.png, energy.png and latency.png under ``out/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = Path(out) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    label = f"{summary['scheme']}" + (f" q={summary['bits']}" if summary["scheme"] == "sflam" else "")
    rounds = np.arange(1, summary["rounds"] + 1)
    per = summary["per_round"]
    written = []

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(summary["accuracy_rounds"], [100 * a for a in summary["accuracy_per_round"]], marker=".", label=label)
    ax.set(xlabel="round", ylabel="test accuracy [%]", title="accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, plots / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    up = np.cumsum(per["bytes_up"]) / 1e6
    ax.plot(rounds, up, label=f"uplink ({label})")
    if summary["bytes_up_fp32"] and summary["bytes_up"]:
        ax.plot(rounds, up * summary["bytes_up_fp32"] / summary["bytes_up"], ls="--", label="uplink if fp32")
    ax.set(xlabel="round", ylabel="cumulative MB", title="uplink bytes")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, plots / "bytes.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(rounds, per["energy_j"], marker=".", label="reported by devices")
    if summary["modeled"]["per_round_energy_j"]:
        ax.plot(rounds, summary["modeled"]["per_round_energy_j"], marker=".", label="system model")
    ax.set(xlabel="round", ylabel="device energy per round [J]", title="energy")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, plots / "energy.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bottom = np.zeros(len(rounds))
    for phase in PHASES:
        values = np.asarray(per[f"{phase}_s"], dtype=float)
        ax.bar(rounds, values, bottom=bottom, label=phase)
        bottom += values
    ax.plot(rounds, per["latency_s"], color="k", marker=".", lw=1, label="round wall time")
    ax.set(xlabel="round", ylabel="seconds (mean device)", title="latency per round")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    written.append(_save(fig, plots / "latency.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
