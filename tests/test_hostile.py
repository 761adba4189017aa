"""10,000 hostile messages at a live server and live devices on the provisioned TLS broker.

sflam.testing.hostile builds them from captured traffic (malformed, mutated, oversized, replayed,
stale, and forged: well-formed new plans, models, gradients, activations and updates, unsigned or
signed with the attacker's own key) and publishes them as a user the ACL lets write every topic
of the run (the server's broker rights, not its signing key), while a server and two device
processes of a signed fleet train. Every one must be refused and counted, every forged one by its
signature, no process may fall over, training must go on, and resident memory must stay bounded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sflam.testing.hostile import CATEGORIES, AttackConfig, run_attack

pytestmark = pytest.mark.broker
SHOTS = 10_000
RSS_GROWTH_MIB = {"server": 256, "dev-0": 64, "dev-1": 64}  # peak over before; limits in docs/reliability.md


def test_ten_thousand_hostile_messages_are_refused_and_counted_while_training_goes_on(
        quick_bundle: Path, tmp_path: Path) -> None:
    # Execute
    report = run_attack(AttackConfig(workdir=tmp_path, bundle=quick_bundle, shots=SHOTS, progress=lambda s: None))
    # Assert: everyone was up when the attack ended and stopped cleanly on SIGTERM (exit 130)
    assert report.alive_after == {"server": True, "dev-0": True, "dev-1": True}
    assert report.exit_codes == {"server": 130, "dev-0": 130, "dev-1": 130}
    assert sum(report.sent.values()) == SHOTS
    for target in ("server", "dev-0", "all devices"):
        assert {c for c in CATEGORIES if report.sent[f"{target}/{c}"] > 0} == set(CATEGORIES), target
    # every shot refused and counted; more only by what legitimate re-sends add
    for name, sent in report.sent_by_target.items():
        refused = report.refused[name]
        assert sent <= refused <= sent + report.slack[name], (name, sent, refused, report.counters[name])
    # every forged shot was refused for its signature (other shots may be too: they are unsigned)
    forged = {"server": report.sent["server/forged"], "dev-0": report.sent["dev-0/forged"]}
    forged["dev-0"] += report.sent["all devices/forged"]
    for name, count in forged.items():
        assert report.counters[name].get("receiver.rejected.SignatureError", 0) >= count > 0, name
    # training went on, with both devices in every round
    assert report.rounds_during_attack >= 2
    assert all(completed == ["dev-0", "dev-1"] for completed in report.completed_during_attack)
    # memory bounded
    for name, rss in report.rss_mib.items():
        assert rss["peak"] - rss["before"] <= RSS_GROWTH_MIB[name], (name, rss)
