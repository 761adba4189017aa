"""Data sets (digits, CIFAR-10 binary, image folders), model input and batching."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from server_runtime.data import (
    BatchLoader,
    DatasetError,
    ImageSet,
    load_dataset,
    to_model_input,
)
from server_runtime.data.datasets import CIFAR10_CLASSES, stratified_split

RECORDS = 20  # per fake CIFAR-10 batch file


# --- digits -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def test_digits_loads_offline_with_shapes_dtypes_and_classes(digits) -> None:
    # Execute / Assert
    assert digits.name == "digits"
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.train.images.shape[1:] == (8, 8, 3)
    assert digits.train.images.dtype == np.uint8 and digits.train.labels.dtype == np.int64
    assert digits.train.num_classes == 10
    assert digits.train.class_names == tuple(str(d) for d in range(10))
    assert digits.train.images.max() == 255 and digits.train.images.min() == 0
    assert (digits.train.images[..., 0] == digits.train.images[..., 2]).all()  # grey in RGB


def test_digits_split_is_stratified_and_deterministic(digits) -> None:
    # Execute
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    # Assert
    assert np.array_equal(again.train.images, digits.train.images)
    assert np.array_equal(again.test.labels, digits.test.labels)
    assert not np.array_equal(other.test.images, digits.test.images)
    train_counts = np.bincount(digits.train.labels, minlength=10)
    test_counts = np.bincount(digits.test.labels, minlength=10)
    fraction = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(fraction - 0.2) < 0.01)


def test_a_validation_set_is_carved_from_train_never_from_test(digits) -> None:
    # Execute
    held = load_dataset("digits", seed=0, validation_fraction=0.1)
    # Assert: the test set is untouched; train and validation partition the old train, stratified
    assert np.array_equal(held.test.images, digits.test.images) and digits.validation is None
    assert len(held.train) + len(held.validation) == len(digits.train) and len(held.validation) == 143
    old = {image.tobytes() for image in digits.train.images}
    train, validation = ({image.tobytes() for image in part.images} for part in (held.train, held.validation))
    assert train | validation == old and train.isdisjoint(validation)
    counts = np.bincount(held.validation.labels, minlength=10) / np.bincount(digits.train.labels, minlength=10)
    assert np.all(np.abs(counts - 0.1) < 0.01)
    again = load_dataset("digits", seed=0, validation_fraction=0.1)
    assert np.array_equal(again.validation.labels, held.validation.labels)  # deterministic: server = simulate


def test_stratified_split_covers_every_index_once_and_keeps_singletons_in_train() -> None:
    # Prepare
    labels = np.array([0] * 10 + [1] * 5 + [2])
    # Execute
    train, test = stratified_split(labels, 0.2, seed=3)
    # Assert
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(16))
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]


def test_imageset_subset_and_validation() -> None:
    # Prepare
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    data = ImageSet(images, np.array([0, 1, 1, 0]), ("a", "b"))
    # Execute
    part = data.subset([3, 1])
    # Assert
    assert len(part) == 2 and part.labels.tolist() == [0, 1]
    assert np.array_equal(part.images[0], images[3])
    with pytest.raises(DatasetError, match="labels must lie"):
        ImageSet(images, np.array([0, 1, 2, 0]), ("a", "b"))
    with pytest.raises(DatasetError, match="uint8"):
        ImageSet(images.astype(np.float32), np.zeros(4, np.int64), ("a",))


def test_unknown_spec_lists_the_accepted_forms() -> None:
    with pytest.raises(DatasetError, match=r"digits \| cifar10:<dir> \| folder:<dir>"):
        load_dataset("mnist")


# --- CIFAR-10 binary --------------------------------------------------------------------------


def _fake_records(rng: np.random.Generator, n: int) -> np.ndarray:
    records = rng.integers(0, 256, size=(n, 3073), dtype=np.uint8)
    records[:, 0] = np.arange(n) % 10
    return records


def _write_cifar(root: Path, meta: bool = True) -> dict[str, np.ndarray]:
    """Five data batches and a test batch of RECORDS records each; returns the records."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        written[name] = _fake_records(rng, RECORDS)
        written[name].tofile(root / name)
    if meta:
        (root / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    return written


def test_cifar10_binary_round_trips_pixels_labels_and_channel_order(tmp_path: Path) -> None:
    # Prepare: record 0 of batch 1 has constant R=10, G=20, B=30 planes
    written = _write_cifar(tmp_path / "cifar-10-batches-bin")
    first = written["data_batch_1.bin"]
    first[0, 1:] = np.repeat(np.array([10, 20, 30], np.uint8), 1024)
    first.tofile(tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin")
    # Execute
    data = load_dataset(f"cifar10:{tmp_path}")
    # Assert
    assert data.name == "cifar10"
    assert data.train.images.shape == (5 * RECORDS, 32, 32, 3)
    assert data.test.images.shape == (RECORDS, 32, 32, 3)
    assert data.train.images[0, 5, 7].tolist() == [10, 20, 30]
    record = written["data_batch_3.bin"][4]  # train sample 2 * RECORDS + 4
    image = data.train.images[2 * RECORDS + 4]
    assert image[3, 17, 2] == record[1 + 2 * 1024 + 3 * 32 + 17]  # B plane, row 3, column 17
    assert np.array_equal(image, record[1:].reshape(3, 32, 32).transpose(1, 2, 0))
    assert data.test.labels.tolist() == (np.arange(RECORDS) % 10).tolist()
    assert data.train.class_names == tuple(f"c{i}" for i in range(10))


def test_cifar10_without_meta_uses_the_standard_names(tmp_path: Path) -> None:
    # Prepare
    _write_cifar(tmp_path, meta=False)
    # Execute
    data = load_dataset(f"cifar10:{tmp_path}")
    # Assert
    assert data.test.class_names == CIFAR10_CLASSES and data.test.class_names[0] == "airplane"


def test_cifar10_truncated_file_and_bad_label_name_the_file(tmp_path: Path) -> None:
    # Prepare
    written = _write_cifar(tmp_path / "a")
    (tmp_path / "a" / "test_batch.bin").write_bytes(written["test_batch.bin"].tobytes()[:-5])
    records = written["data_batch_2.bin"].copy()
    records[3, 0] = 10
    _write_cifar(tmp_path / "b")
    records.tofile(tmp_path / "b" / "data_batch_2.bin")
    # Execute / Assert
    with pytest.raises(DatasetError, match=r"test_batch\.bin is .* multiple of the 3073"):
        load_dataset(f"cifar10:{tmp_path / 'a'}")
    with pytest.raises(DatasetError, match=r"data_batch_2\.bin: record 3 has label 10"):
        load_dataset(f"cifar10:{tmp_path / 'b'}")


def test_cifar10_missing_batch_and_missing_dir(tmp_path: Path) -> None:
    # Prepare
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_4.bin").unlink()
    # Execute / Assert
    with pytest.raises(DatasetError, match="data_batch_4.bin"):
        load_dataset(f"cifar10:{tmp_path / 'c'}")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")


def test_cifar10_pickled_python_version_is_refused_not_unpickled(tmp_path: Path) -> None:
    # Prepare: a pickle that would fail loudly if it were ever loaded
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({"never": "read"}))
    # Execute / Assert
    with pytest.raises(DatasetError, match="binary version"):
        load_dataset(f"cifar10:{tmp_path}")


# --- image folders ----------------------------------------------------------------------------


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_train_and_test_subfolders(tmp_path: Path) -> None:
    # Prepare: classes named so sorting matters; one greyscale image
    for split, count in (("train", 3), ("test", 1)):
        for i in range(count):
            _png(tmp_path / split / "zebra" / f"{i}.png", (200, 0, 0))
            _png(tmp_path / split / "ant" / f"{i}.png", (0, 0, 90))
    Image.new("L", (6, 4), 77).save(tmp_path / "train" / "ant" / "grey.png")
    # Execute
    data = load_dataset(f"folder:{tmp_path}")
    # Assert
    assert data.train.class_names == ("ant", "zebra")
    assert len(data.train) == 7 and len(data.test) == 2
    assert data.train.images.shape == (7, 4, 6, 3)
    assert data.train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert data.train.images[3, 0, 0].tolist() == [77, 77, 77]
    assert data.train.images[4, 2, 3].tolist() == [200, 0, 0]
    assert data.test.labels.tolist() == [0, 1]


def test_folder_single_tree_is_split_by_seed_and_resized_to_the_common_size(
    tmp_path: Path,
) -> None:
    # Prepare: 5 images per class, one of them larger than the rest
    for i in range(5):
        _png(tmp_path / "b" / f"{i}.png", (0, 255, 0))
        _png(tmp_path / "a" / f"{i}.jpg", (255, 255, 255), size=(12, 8) if i == 0 else (6, 4))
    # Execute
    data = load_dataset(f"folder:{tmp_path}", seed=1, test_fraction=0.2)
    again = load_dataset(f"folder:{tmp_path}", seed=1, test_fraction=0.2)
    # Assert
    assert data.train.class_names == ("a", "b")
    assert np.bincount(data.test.labels).tolist() == [1, 1]
    assert np.bincount(data.train.labels).tolist() == [4, 4]
    assert data.train.images.shape[1:] == (4, 6, 3)
    assert np.array_equal(data.test.images, again.test.images)
    assert (data.train.images[data.train.labels == 1] == [0, 255, 0]).all()


def test_folder_errors_name_the_problem(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "empty_tree").mkdir()
    (tmp_path / "one_empty_class" / "cat").mkdir(parents=True)
    _png(tmp_path / "one_empty_class" / "dog" / "0.png", (1, 2, 3))
    (tmp_path / "one_empty_class" / "cat" / "notes.txt").write_text("no images here")
    _png(tmp_path / "broken" / "dog" / "0.png", (1, 2, 3))
    (tmp_path / "broken" / "dog" / "1.png").write_bytes(b"not a png")
    # Execute / Assert
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset(f"folder:{tmp_path / 'empty_tree'}")
    with pytest.raises(DatasetError, match=r"class folder .*cat has no images"):
        load_dataset(f"folder:{tmp_path / 'one_empty_class'}")
    with pytest.raises(DatasetError, match=r"cannot read image .*1\.png"):
        load_dataset(f"folder:{tmp_path / 'broken'}")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"folder:{tmp_path / 'missing'}")


# --- model input and batching -----------------------------------------------------------------


def test_to_model_input_normalizes_a_constant_image_exactly() -> None:
    # Prepare
    images = np.full((2, 8, 8, 3), 51, dtype=np.uint8)  # 51 / 255 = 0.2
    # Execute
    x = to_model_input(images, 8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    # Assert
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    expected = torch.tensor([(0.2 - 0.1) / 0.5, 0.0, (0.2 - 0.3) / 0.1])
    assert torch.allclose(x[0, :, 3, 3], expected, atol=1e-6)


def test_to_model_input_resizes_up_and_down_keeping_constants_and_channels() -> None:
    # Prepare: channel c holds value 60 * (c + 1)
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8) + np.array([60, 120, 180], np.uint8)
    # Execute
    up = to_model_input(images, 32, mean=(0, 0, 0), std=(1, 1, 1))
    down = to_model_input(images, 4, mean=(0, 0, 0), std=(1, 1, 1))
    # Assert
    assert up.shape == (3, 3, 32, 32) and down.shape == (3, 3, 4, 4)
    for out in (up, down):
        assert torch.allclose(out[:, 1], torch.full_like(out[:, 1], 120 / 255), atol=1e-6)
    ramp = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))[None]
    halved = to_model_input(ramp, 4, mean=(0, 0, 0), std=(1, 1, 1))[0, 0, 0] * 255
    assert torch.allclose(halved[1:3], torch.tensor([75.0, 135.0]), atol=1e-3)  # pair means
    line = np.zeros((1, 8, 8, 3), np.uint8)
    line[:, :, 3] = 255  # point sampling 8 -> 2 (at columns 1.5 and 5.5) would miss it
    quarter = to_model_input(line, 2, mean=(0, 0, 0), std=(1, 1, 1))
    assert quarter.max() > 0.1  # antialiasing keeps a share of the thin line


def test_to_model_input_rejects_bad_input() -> None:
    with pytest.raises(DatasetError, match="uint8"):
        to_model_input(np.zeros((1, 4, 4, 3), np.float32), 4, (0, 0, 0), (1, 1, 1))
    with pytest.raises(DatasetError, match="std"):
        to_model_input(np.zeros((1, 4, 4, 3), np.uint8), 4, (0, 0, 0), (1, 0, 1))


def _tagged_set(n: int) -> ImageSet:
    """Images whose pixel value is their index, so a batch tells which samples it holds."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3))
    return ImageSet(np.ascontiguousarray(images), np.arange(n) % 3, ("a", "b", "c"))


def _epoch_order(loader: BatchLoader) -> list[int]:
    order = []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 6, 6)
        tags = (x[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(y, tags % 3)
        order.extend(tags.tolist())
    return order


def test_batch_loader_covers_each_index_once_per_epoch_and_reshuffles() -> None:
    # Prepare
    data = _tagged_set(23)
    kwargs = dict(batch_size=5, image_size=6, mean=(0, 0, 0), std=(1, 1, 1), shuffle=True)
    loader = BatchLoader(data, seed=4, **kwargs)
    twin = BatchLoader(data, seed=4, **kwargs)
    # Execute
    first, second = _epoch_order(loader), _epoch_order(loader)
    # Assert
    assert len(loader) == 5
    assert sorted(first) == list(range(23)) and sorted(second) == list(range(23))
    assert first != second
    assert _epoch_order(twin) == first
    assert _epoch_order(BatchLoader(data, seed=5, **kwargs)) != first


def test_batch_loader_in_order_with_indices_and_drop_last() -> None:
    # Prepare
    data = _tagged_set(23)
    kwargs = dict(batch_size=4, image_size=6, mean=(0, 0, 0), std=(1, 1, 1), shuffle=False)
    # Execute
    loader = BatchLoader(data, indices=np.array([9, 2, 7, 11, 20, 3]), drop_last=True, **kwargs)
    # Assert
    assert len(loader) == 1 and _epoch_order(loader) == [9, 2, 7, 11]
    assert len(BatchLoader(data, **kwargs)) == 6
    with pytest.raises(DatasetError, match="indices"):
        BatchLoader(data, indices=np.array([23]), **kwargs)
