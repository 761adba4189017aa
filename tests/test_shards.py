"""`sflam data partition --out DIR`: one shard per device in the folder and npz layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server_runtime.data import ImageSet, load_dataset, partition
from server_runtime.data.shards import ShardError, check_class_names_for_folders, write_shards
from sflam.cli import main

DIGITS = [str(k) for k in range(10)]


def _partition_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["data", "partition", "--dataset", "digits", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _expected_parts(devices: int, resample: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The partition the CLI draws with its defaults (dirichlet, alpha 0.5, seed 0)."""
    train = load_dataset("digits", seed=0).train
    return partition(train.labels, devices, "dirichlet", seed=0, alpha=0.5, shards_per_device=2,
                     resample=resample)


def _manifest(folder: Path) -> list[list[str]]:
    with open(folder / "manifest.csv", newline="") as handle:
        return list(csv.reader(handle))


def _tiny_set(names: tuple[str, ...]) -> ImageSet:
    images = np.arange(4 * 2 * 3 * 3, dtype=np.uint8).reshape(4, 2, 3, 3)
    return ImageSet(images, np.arange(4, dtype=np.int64) % len(names), names)


# --- folder and npz layouts -------------------------------------------------------------------


def test_folder_shards_hold_exactly_the_partitioned_training_images(tmp_path, capsys) -> None:
    # Prepare
    out = tmp_path / "shards"
    train = load_dataset("digits", seed=0).train
    parts = _expected_parts(3)
    # Execute
    code, stdout, _ = _partition_cli(capsys, "--devices", "3", "--out", str(out), "--format", "folder")
    # Assert
    assert code == 0
    assert stdout.splitlines()[-1] == f"wrote 3 shards (folder) to {out}; summary in {out}/summary.json"
    assert sorted(p.name for p in out.iterdir()) == ["dev-0", "dev-1", "dev-2", "summary.json"]
    for k, indices in enumerate(parts):
        folder = out / f"dev-{k}"
        assert (folder / "classes.txt").read_text() == "".join(f"{n}\n" for n in DIGITS)
        rows = _manifest(folder)
        labels = train.labels[indices]
        assert rows[0] == ["path", "label"]
        assert rows[1:] == [[f"{label}/{i:05d}.png", str(label)] for i, label in enumerate(labels)]
        decoded = np.stack([np.asarray(Image.open(folder / path)) for path, _ in rows[1:]])
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, train.images[indices])
        held = {p.name for p in folder.iterdir() if p.is_dir()}
        assert held == {str(label) for label in np.unique(labels)}


def test_summary_describes_the_partition_and_every_shard(tmp_path, capsys) -> None:
    # Prepare
    out = tmp_path / "shards"
    parts = _expected_parts(3)
    # Execute
    _partition_cli(capsys, "--devices", "3", "--out", str(out))
    # Assert
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "folder" and summary["dataset"] == "digits"
    assert summary["name"] == "digits" and summary["scheme"] == "dirichlet"
    assert (summary["alpha"], summary["shards_per_device"], summary["seed"]) == (0.5, 2, 0)
    assert summary["resample"] is None and summary["devices"] == 3
    assert summary["class_names"] == DIGITS and 0.0 < summary["skew"] < 1.0
    assert [s["device_id"] for s in summary["shards"]] == ["dev-0", "dev-1", "dev-2"]
    assert [s["path"] for s in summary["shards"]] == ["dev-0", "dev-1", "dev-2"]
    assert [s["samples"] for s in summary["shards"]] == [len(p) for p in parts]
    assert all(sum(s["histogram"]) == s["samples"] for s in summary["shards"])
    assert all(len(s["histogram"]) == 10 for s in summary["shards"])


def test_npz_shards_load_without_pickle_and_match_the_partition(tmp_path, capsys) -> None:
    # Prepare
    out = tmp_path / "shards"
    train = load_dataset("digits", seed=0).train
    parts = _expected_parts(3)
    # Execute
    code, _, _ = _partition_cli(capsys, "--devices", "3", "--out", str(out), "--format", "npz")
    # Assert
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["dev-0.npz", "dev-1.npz", "dev-2.npz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "npz"
    for k, indices in enumerate(parts):
        with np.load(out / f"dev-{k}.npz", allow_pickle=False) as shard:
            assert shard["images"].dtype == np.uint8 and shard["labels"].dtype == np.int64
            assert np.array_equal(shard["images"], train.images[indices])
            assert np.array_equal(shard["labels"], train.labels[indices])
            assert shard["class_names"].tolist() == DIGITS
        assert summary["shards"][k]["path"] == f"dev-{k}.npz"
        assert summary["shards"][k]["histogram"] == np.bincount(train.labels[indices], minlength=10).tolist()


def test_resampled_duplicates_get_a_file_each(tmp_path, capsys) -> None:
    # Prepare: 4 devices of 400-450 from pools of about 360, drawn with replacement: duplicates
    out = tmp_path / "shards"
    train = load_dataset("digits", seed=0).train
    parts = _expected_parts(4, resample=(400, 450))
    assert any(len(np.unique(p)) < len(p) for p in parts)
    # Execute
    code, _, _ = _partition_cli(capsys, "--devices", "4", "--resample", "400-450", "--out", str(out))
    # Assert
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resample"] == [400, 450]
    for k, indices in enumerate(parts):
        paths = [row[0] for row in _manifest(out / f"dev-{k}")[1:]]
        assert len(set(paths)) == len(paths) == len(indices) == summary["shards"][k]["samples"]
        assert len(list((out / f"dev-{k}").glob("*/*.png"))) == len(indices)
        decoded = np.stack([np.asarray(Image.open(out / f"dev-{k}" / p)) for p in paths])
        assert np.array_equal(decoded, train.images[indices])


def test_progress_reports_at_most_about_twenty_devices(tmp_path) -> None:
    # Prepare
    train, lines = _tiny_set(("a", "b")), []
    parts = [np.array([k % 4]) for k in range(1000)]
    # Execute
    write_shards(train, parts, tmp_path / "out", "npz", {"dataset": "tiny"}, progress=lines.append)
    # Assert
    assert 2 <= len(lines) <= 22
    assert lines[0] == "wrote dev-0: 1 images" and lines[-2] == "wrote dev-999: 1 images"
    assert lines[-1].startswith("wrote 1000 shards (npz) to ")


# --- refusals ---------------------------------------------------------------------------------


def test_a_non_empty_out_folder_is_refused_and_left_alone(tmp_path, capsys) -> None:
    # Prepare
    (tmp_path / "keep.txt").write_text("mine")
    # Execute
    code, stdout, stderr = _partition_cli(capsys, "--devices", "3", "--out", str(tmp_path))
    # Assert
    assert code == 2 and stdout == ""
    assert "is not empty; choose an empty or new folder" in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_format_without_out_is_refused(capsys) -> None:
    # Execute
    code, stdout, stderr = _partition_cli(capsys, "--devices", "3", "--format", "npz")
    # Assert
    assert code == 2 and stdout == ""
    assert "--format needs --out" in stderr


@pytest.mark.parametrize(
    "name, why",
    [("", "not a folder name"), (".", "not a folder name"), ("..", "not a folder name"),
     (".hidden", "starts with '.'"), ("a/b", "'/'"), ("a\\b", "'\\'"), ("a\0b", "NUL"),
     ("a\nb", "newline"), ("cat,dog", "comma")],
)
def test_unsafe_class_names_are_refused_before_writing(tmp_path, name: str, why: str) -> None:
    # Prepare
    names = ("ok", name)
    out = tmp_path / "out"
    # Execute / Assert
    with pytest.raises(ShardError, match="class name") as caught:
        check_class_names_for_folders(names)
    assert repr(name) in str(caught.value) and why in str(caught.value)
    with pytest.raises(ShardError):
        write_shards(_tiny_set(names), [np.arange(4)], out, "folder", {})
    assert not out.exists()


def test_duplicate_class_names_are_refused() -> None:
    # Execute / Assert
    with pytest.raises(ShardError, match="more than once"):
        check_class_names_for_folders(("a", "b", "a"))


def test_npz_keeps_names_a_folder_could_not(tmp_path) -> None:
    # Prepare
    names = ("cat,dog", ".hidden")
    # Execute
    write_shards(_tiny_set(names), [np.array([0, 1, 1])], tmp_path / "out", "npz", {}, progress=print)
    # Assert
    with np.load(tmp_path / "out" / "dev-0.npz", allow_pickle=False) as shard:
        assert shard["class_names"].tolist() == list(names)
        assert shard["labels"].tolist() == [0, 1, 1]
