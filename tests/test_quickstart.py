"""The in-process split federated preview learns on real data (digits)."""

from __future__ import annotations

import argparse

from server_runtime.quickstart import quickstart


def test_split_federated_preview_learns_digits(capsys) -> None:
    # Prepare: near-IID split, every device every round, a few rounds.
    args = argparse.Namespace(
        model="vit_quick_patch4_16", dataset="digits", devices=4, per_round=4, alpha=100.0,
        rounds=6, local_epochs=3, batch_size=32, lr=0.05, seed=0,
    )
    # Execute
    results = quickstart(args)
    # Assert: well above chance (10%) and the training loss falls; one progress line a round.
    assert len(results) == 6
    assert results[-1].test_accuracy > 0.2
    assert results[-1].train_loss < results[0].train_loss
    assert all(r.samples == 1438 for r in results)  # every training image used each round
    assert capsys.readouterr().out.count("round ") == 6
