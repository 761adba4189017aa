"""``sflam allocate``: solve one round's allocation for a generated or saved scenario, with baselines."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from typing import TYPE_CHECKING

import numpy as np

from allocator.baselines import NAMES, BaselineResult, all_baselines
from allocator.scenario import (
    DEFAULT_MODEL,
    DEFAULT_PROFILES,
    ScenarioError,
    dump_scenario,
    full_model_macs_per_sample,
    full_model_params,
    generate_scenario,
    infer_model,
    load_scenario,
    model_shape,
)
from allocator.system import Problem, bits_down_of

if TYPE_CHECKING:
    from allocator.bcd import Result

TABLE_ROWS = 50  # devices shown in the text table; --json lists all
GENERATOR_OPTIONS = ("devices", "seed", "profiles", "model", "radius_m", "local_epochs")
PARAM_OPTIONS = {  # argparse dest -> SystemParams field
    "t_max": "t_max_s",
    "lambda_energy": "lambda_energy",
    "lambda_time": "lambda_time",
    "lambda_quant": "lambda_quant",
    "subchannels": "subchannels",
    "bits_down": "allowed_bits_down",
    "downlink_rate": "downlink_rate_bps",
}


def cmd_allocate(args: argparse.Namespace) -> int:
    """Build the problem, solve it, score the baselines, print a table (or one JSON object)."""
    problem = problem_from_args(args)
    if args.dump_scenario:
        dump_scenario(problem, args.dump_scenario)
    from allocator.bcd import solve  # cvxpy and the solver only once the arguments are good

    result = solve(problem)
    baselines = all_baselines(problem, *_fl_numbers(problem))
    if args.json:
        print(json.dumps(report(problem, result, baselines), indent=1, allow_nan=False))
    else:
        print(render(problem, result, baselines))
    return 0


def problem_from_args(args: argparse.Namespace) -> Problem:
    """The scenario file's problem, or a generated one; explicit parameter flags override either."""
    overrides = {field: getattr(args, dest) for dest, field in PARAM_OPTIONS.items() if getattr(args, dest) is not None}
    if args.scenario:
        given = [f"--{name.replace('_', '-')}" for name in GENERATOR_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ScenarioError("arguments", [f"{', '.join(given)}: only for a generated scenario, not with --scenario"])
        problem = load_scenario(args.scenario)
        params = dataclasses.replace(problem.params, **overrides)
        if params.subchannels != problem.params.subchannels:
            return dataclasses.replace(problem, params=params, subchannel_gain=None)
        return dataclasses.replace(problem, params=params)
    t_max_s = overrides.pop("t_max_s", None)
    return generate_scenario(
        args.devices or 10,
        args.seed if args.seed is not None else 0,
        profiles=_profile_list(args.profiles),
        radius_m=args.radius_m if args.radius_m is not None else 500.0,
        model=args.model or DEFAULT_MODEL,
        local_epochs=args.local_epochs or 1,
        t_max_s=t_max_s,
        params=overrides,
    )


def _profile_list(text: str | None) -> tuple[str, ...]:
    """The comma list of --profiles, or the default fleet mix."""
    if text is None:
        return DEFAULT_PROFILES
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ScenarioError("--profiles", [f"expected a comma list of profile names, got {text!r}"])
    return names


def _fl_numbers(problem: Problem) -> tuple[float, float]:
    """The FL baseline's compute ratio and model bits for the problem's preset (default ViT-B/32)."""
    shape = model_shape(infer_model(problem.params) or DEFAULT_MODEL)
    return full_model_macs_per_sample(shape) / shape.device_macs_per_sample, 32.0 * full_model_params(shape)


def _finite(value: float) -> float | None:
    """JSON has no infinity: None for it."""
    return float(value) if math.isfinite(value) else None


def _improvement_pct(objective: float, reference: float) -> float | None:
    """How much lower ``objective`` is than ``reference``, in percent of it."""
    if not (math.isfinite(objective) and math.isfinite(reference)) or reference == 0:
        return None
    return 100.0 * (reference - objective) / reference


def _comparable_gain(result: Result, baselines: dict[str, BaselineResult]) -> float | None:
    """Percent below the fixed baseline, only when both meet t_max (else the figures do not compare)."""
    fixed = baselines["fixed"].evaluation
    if result.status == "infeasible" or not (result.evaluation.feasible and fixed.feasible):
        return None
    return _improvement_pct(result.evaluation.objective, fixed.objective)


def _comparison_line(result: Result, baselines: dict[str, BaselineResult]) -> str:
    """One sentence on the joint allocation against the fixed baseline."""
    fixed = baselines["fixed"].evaluation
    gain = _comparable_gain(result, baselines)
    if gain is not None:
        return f"objective {gain:.1f}% below fixed (8 bits, max power, equal bandwidth)"
    if result.status == "infeasible":
        return "no allocation meets t_max; the figures above are the infeasible fallback, not comparable to fixed"
    if not fixed.feasible:
        return f"fixed (8 bits, max power, equal bandwidth) misses t_max ({fixed.round_latency_s:.3f} s); the joint allocation meets it"
    return ""


def report(problem: Problem, result: Result, baselines: dict[str, BaselineResult]) -> dict[str, object]:
    """The --json object: the solve, every device's allocation and figures, the baselines."""
    alloc, ev, fleet = result.allocation, result.evaluation, problem.fleet
    down = bits_down_of(problem.params, alloc)
    devices = [
        {
            "id": fleet.ids[k],
            "profile": fleet.profiles[k],
            "bits": int(alloc.bits[k]),
            "bits_down": int(down[k]),
            "tx_power_w": float(alloc.tx_power_w[k]),
            "bandwidth_hz": float(alloc.bandwidth_hz[k]),
            "latency_s": _finite(ev.latency_s[k]),
            "energy_j": _finite(ev.energy_j[k]),
        }
        for k in range(len(fleet))
    ]
    return {
        "status": result.status,
        "objective": _finite(ev.objective),
        "solve_time_s": float(result.solve_time_s),
        "iterations": int(result.iterations),
        "message": result.message,
        "t_max_s": float(problem.params.t_max_s),
        "energy_j": _finite(float(np.sum(ev.energy_j))),
        "round_latency_s": _finite(ev.round_latency_s),
        "phi": _finite(ev.phi),
        "improvement_over_fixed_pct": _comparable_gain(result, baselines),
        "devices": devices,
        "baselines": {name: _baseline_summary(baselines[name]) for name in NAMES},
    }


def _baseline_summary(baseline: BaselineResult) -> dict[str, object]:
    """A baseline's totals for --json."""
    ev = baseline.evaluation
    return {
        "objective": _finite(ev.objective),
        "energy_j": _finite(float(np.sum(ev.energy_j))),
        "latency_s": _finite(ev.round_latency_s),
        "feasible": bool(ev.feasible),
    }


def render(problem: Problem, result: Result, baselines: dict[str, BaselineResult]) -> str:
    """The human-readable report: a row per device, totals, baselines, improvement over fixed."""
    alloc, ev, fleet = result.allocation, result.evaluation, problem.fleet
    chosen = bool(problem.params.allowed_bits_down)  # a g column when the gradient bits are the allocator's
    down = bits_down_of(problem.params, alloc)
    lines = [f"{'id':<8} {'profile':<18} {'q':>3}" + (f" {'g':>3}" if chosen else "")
             + f" {'p [W]':>8} {'B [MHz]':>9} {'T [s]':>10} {'E [J]':>10}"]
    for k in range(min(len(fleet), TABLE_ROWS)):
        lines.append(
            f"{fleet.ids[k]:<8} {fleet.profiles[k]:<18} {alloc.bits[k]:>3d}" + (f" {down[k]:>3d}" if chosen else "")
            + f" {alloc.tx_power_w[k]:>8.4f} {alloc.bandwidth_hz[k] / 1e6:>9.4f} {ev.latency_s[k]:>10.3f}"
            f" {ev.energy_j[k]:>10.3f}"
        )
    if len(fleet) > TABLE_ROWS:
        lines.append(f"... {len(fleet) - TABLE_ROWS} more devices (--json lists every one)")
    lines += [
        "",
        f"total energy {np.sum(ev.energy_j):.4f} J, round latency {ev.round_latency_s:.3f} s"
        f" (t_max {problem.params.t_max_s:.3f} s), Phi {ev.phi:.6g}",
        f"objective {ev.objective:.6g}  status {result.status}  {result.iterations} iterations"
        f"  solved in {result.solve_time_s * 1e3:.1f} ms" + (f"  ({result.message})" if result.message else ""),
        "",
        f"{'baseline':<14} {'objective':>12} {'energy [J]':>12} {'latency [s]':>12}  feasible",
    ]
    for name in NAMES:
        b = baselines[name].evaluation
        lines.append(
            f"{name:<14} {b.objective:>12.6g} {np.sum(b.energy_j):>12.4f} {b.round_latency_s:>12.3f}  {'yes' if b.feasible else 'no'}"
        )
    comparison = _comparison_line(result, baselines)
    if comparison:
        lines += ["", comparison]
    return "\n".join(lines)
