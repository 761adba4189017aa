"""Hostile input at a live server and live devices on a provisioned TLS broker (issue: reliability).

Provisions a fleet (CA, passwords, ACL) in a temporary folder, starts mosquitto with it, a server
and two device processes training the quickstart model on digits, and an attacker whom the ACL
lets read and write every topic of the run. The attacker learns from the traffic and publishes
``--shots`` malformed, mutated, oversized, replayed and stale messages (sflam.testing.hostile), half at
the server's topics and half at the devices'. Prints what was sent, what each process refused
and counted, the rounds trained meanwhile, and resident memory before, at peak and after.

    .venv/bin/python benchmarks/bench_hostile.py [--shots 10000] [--seed 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sflam.testing.hostile import CATEGORIES, AttackConfig, run_attack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=10_000, help="hostile messages to publish (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--json", type=Path, help="also write the full report here")
    args = parser.parse_args()
    if args.shots < 1:
        parser.error(f"--shots must be >= 1, got {args.shots}")
    from export.bundle import export_bundle

    with tempfile.TemporaryDirectory(prefix="sflam-hostile-") as tmp:
        work = Path(tmp)
        print("exporting the quickstart device bundle ...", flush=True)
        export_bundle("vit_quick_patch4_16", "raspberry-pi-5", work / "bundle", batch=4, formats=("onnx",))
        t0 = time.monotonic()
        report = run_attack(AttackConfig(workdir=work / "run", bundle=work / "bundle", shots=args.shots,
                                         seed=args.seed))
        wall = time.monotonic() - t0
    print(f"\n{sum(report.sent.values())} shots in {report.attack_s:.1f} s "
          f"({sum(report.sent.values()) / max(report.attack_s, 1e-9):.0f}/s, each PUBACKed), run {wall:.0f} s in all")
    print(f"\nshots by target and category\n{'target':<12}" + "".join(f"{c:>11}" for c in CATEGORIES))
    for target in ("server", "dev-0", "all devices"):
        row = "".join(f"{report.sent[f'{target}/{c}']:>11}" for c in CATEGORIES)
        print(f"{target:<12}{row}")
    print()
    for name in ("server", "dev-0", "dev-1"):
        got, refused = report.sent_by_target[name], report.refused[name]
        print(f"{name:<12} received {got:>6}, refused and counted {refused:>6} (ratio {refused / got:.4f}; "
              f"legitimate re-sends may add up to {report.slack[name]})")
    print("\nby kind: " + ", ".join(f"{k} {v}" for k, v in sorted(report.kinds.items())))
    print(f"\nrounds trained during the attack: {report.rounds_during_attack}, every one with "
          f"{sorted({d for c in report.completed_during_attack for d in c})}" if report.completed_during_attack else
          "\nno round trained during the attack")
    print(f"median round time: {report.round_s_before:.2f} s before the attack, {report.round_s_during:.2f} s during it "
          f"(ratio {report.round_s_during / report.round_s_before:.2f})")
    print("\nresident memory (MiB):  before    peak   after   peak/before")
    for name, rss in report.rss_mib.items():
        print(f"  {name:<20}{rss['before']:>8.1f}{rss['peak']:>8.1f}{rss['after']:>8.1f}"
              f"{rss['peak'] / rss['before']:>10.3f}")
    print(f"\nalive when the attack ended: {report.alive_after}; exit codes after SIGTERM: {report.exit_codes}")
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=1))
        print(f"report written to {args.json}")


if __name__ == "__main__":
    main()
