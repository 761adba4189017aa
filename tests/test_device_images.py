"""A device's image-file shards (``folder:``, ``manifest:``), its decode cache, the plan's
augmentation and the class checks, numpy + Pillow only, against the server's decoding and
preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime import protocol as p
from edge_runtime.augment import Augment, padded_crop
from edge_runtime.data import (
    DataError,
    DataMismatchError,
    LazyDeviceData,
    Preprocess,
    check_against_plan,
    load_data,
    preprocess_images,
)
from edge_runtime.image_files import DecodeCache

SPEC = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
CLASSES = ("cat", "dog", "owl")


def write_image(path: Path, array: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def random_images(count: int, size: tuple[int, int] = (12, 12), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def class_tree(root: Path, per_class: int = 4, classes: tuple[str, ...] = CLASSES, fmt: str = "PNG") -> Path:
    """``root/<class>/<k>.png`` with random pixels; returns root."""
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    for c, name in enumerate(classes):
        for k, image in enumerate(random_images(per_class, seed=c)):
            write_image(root / name / f"{k:03d}{suffix}", image, fmt)
    return root


def all_batches(data, batch: int = 5, seed: int = 0, **options) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*data.batches(batch, np.random.default_rng(seed), **options))
    return np.concatenate(xs), np.concatenate(ys)


# --- decoding and preprocessing equal the server's --------------------------------------------


@pytest.mark.parametrize(("fmt", "size"), [("PNG", (12, 12)), ("JPEG", (12, 12)), ("PNG", (40, 30)), ("JPEG", (9, 21))])
def test_decoded_files_preprocess_as_the_servers_loader_does(tmp_path: Path, fmt: str, size: tuple[int, int]) -> None:
    from server_runtime.data.datasets import _read_image
    from server_runtime.data.transforms import to_model_input

    # Prepare: one class folder of PNG or JPEG files (JPEG: lossy, so the pixels are Pillow's decode)
    for k, image in enumerate(random_images(6, size, seed=3)):
        write_image(tmp_path / "a" / f"{k}.{fmt.lower()}", image, fmt)
    # Execute
    data = load_data(f"folder:{tmp_path}", SPEC)
    device_pixels = [data.image(i) for i in range(len(data))]
    server_pixels = np.stack([_read_image(path) for path in data.paths])
    server = to_model_input(server_pixels, SPEC.image_size, SPEC.mean, SPEC.std).numpy()
    # Assert: the same pixels decoded, and the same model input within float32 rounding
    np.testing.assert_array_equal(np.stack(device_pixels), server_pixels)
    np.testing.assert_allclose(preprocess_images(device_pixels, SPEC), server, rtol=0, atol=1e-5)
    assert all_batches(data, batch=6)[0].shape == (6, 3, 16, 16)


def test_images_of_different_sizes_share_a_batch(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "0.png", random_images(1, (8, 8))[0])
    write_image(tmp_path / "a" / "1.png", random_images(1, (30, 20))[0])
    x, y = all_batches(load_data(f"folder:{tmp_path}", SPEC), batch=2)
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32 and list(y) == [0, 0]


# --- folder:DIR -------------------------------------------------------------------------------


def test_folder_classes_come_from_classes_txt_else_sorted_names(tmp_path: Path) -> None:
    # Prepare: the same files, once numbered by sorted name, once by a classes.txt in another order
    sorted_tree = class_tree(tmp_path / "sorted")
    listed = class_tree(tmp_path / "listed", classes=("owl", "cat"))
    (listed / "classes.txt").write_text("owl\ndog\ncat\n")
    # Execute
    by_name = load_data(f"folder:{sorted_tree}", SPEC)
    by_list = load_data(f"folder:{listed}", SPEC)
    # Assert
    assert by_name.class_names == CLASSES and np.bincount(by_name.labels).tolist() == [4, 4, 4]
    assert by_list.class_names == ("owl", "dog", "cat")
    labels = {path.parent.name: int(label) for path, label in zip(by_list.paths, by_list.labels)}
    assert labels == {"owl": 0, "cat": 2}
    assert by_list.skipped == 0 and len(by_list) == 8


def test_folder_refusals_are_clear_and_come_before_any_connect(tmp_path: Path) -> None:
    tree = class_tree(tmp_path / "t", classes=("cat", "dgo"))
    (tree / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"dgo.*not classes.*did you mean 'dog'"):
        load_data(f"folder:{tree}", SPEC)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        load_data(f"folder:{tmp_path / 'empty'}", SPEC)
    with pytest.raises(DataError, match="not found"):
        load_data(f"folder:{tmp_path / 'nowhere'}", SPEC)
    with pytest.raises(DataError, match="outside the model's 2 classes"):
        load_data(f"folder:{class_tree(tmp_path / 'three')}", SPEC, num_classes=2)
    with pytest.raises(DataError, match="must be npz:PATH, folder:DIR or manifest:FILE.csv"):
        load_data(f"jpeg:{tree}", SPEC)
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "classes.txt").write_text("cat\ncat\n")
    with pytest.raises(DataError, match="names a class twice: cat"):
        load_data(f"folder:{tmp_path / 'dup'}", SPEC)


def test_unreadable_files_are_skipped_and_counted_and_batches_stay_full(tmp_path: Path) -> None:
    # Prepare: 8 good images, one file that is no image at all, one PNG cut short (its header
    # reads, its pixels do not)
    tree = class_tree(tmp_path, per_class=4, classes=("cat", "dog"))
    (tree / "cat" / "garbage.png").write_bytes(b"not an image at all")
    buffer = io.BytesIO()
    Image.fromarray(random_images(1, (64, 64))[0]).save(buffer, format="PNG")
    (tree / "dog" / "truncated.png").write_bytes(buffer.getvalue()[:200])
    # Execute
    data = load_data(f"folder:{tree}", SPEC)
    opened = (len(data), data.skipped)
    batches = list(data.batches(3, np.random.default_rng(0), drop_last=True))
    # Assert: the garbage file is refused when the folder is opened, the truncated one when drawn
    assert opened == (9, 1)
    assert data.skipped == 2 and len(data) == 8
    assert [x.shape[0] for x, _ in batches] == [3, 3]
    assert sum(y.size for _, y in data.batches(3, np.random.default_rng(1))) == 8  # never drawn again


def test_an_image_too_large_to_decode_safely_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow refuses images over twice MAX_IMAGE_PIXELS (a decompression bomb); 200 pixels stand in here
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    write_image(tmp_path / "a" / "small.png", random_images(1, (8, 8))[0])
    write_image(tmp_path / "a" / "huge.png", random_images(1, (40, 40))[0])
    data = load_data(f"folder:{tmp_path}", SPEC)
    assert (len(data), data.skipped) == (1, 1)


# --- manifest:FILE.csv ------------------------------------------------------------------------


def test_manifest_names_or_ids_with_and_without_classes_txt(tmp_path: Path) -> None:
    images = random_images(4)
    for k, image in enumerate(images):
        write_image(tmp_path / "img" / f"{k}.png", image)
    (tmp_path / "named.csv").write_text("path,label\nimg/0.png,dog\nimg/1.png,cat\nimg/2.png,owl\n")
    (tmp_path / "ids.csv").write_text("img/0.png,2\nimg/3.png,0\n")
    # Execute: names numbered in sorted order without a classes.txt; ids taken as ids
    named = load_data(f"manifest:{tmp_path / 'named.csv'}", SPEC)
    ids = load_data(f"manifest:{tmp_path / 'ids.csv'}", SPEC)
    (tmp_path / "classes.txt").write_text("owl\ndog\ncat\n")
    listed = load_data(f"manifest:{tmp_path / 'named.csv'}", SPEC)
    # Assert
    assert named.class_names == ("cat", "dog", "owl") and named.labels.tolist() == [1, 0, 2]
    assert ids.class_names is None and ids.labels.tolist() == [2, 0]
    assert listed.class_names == ("owl", "dog", "cat") and listed.labels.tolist() == [1, 2, 0]
    np.testing.assert_array_equal(listed.image(0), images[0])


def test_manifest_lists_every_bad_row_and_skips_missing_files(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", random_images(1)[0])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "bad.csv").write_text("a.png,cat\na.png\na.png,dgo\n,cat\na.png,7\n")
    with pytest.raises(DataError) as caught:
        load_data(f"manifest:{tmp_path / 'bad.csv'}", SPEC)
    message = str(caught.value)
    assert "line 2" in message and "line 4" in message  # malformed rows, all of them
    (tmp_path / "labels.csv").write_text("a.png,dgo\na.png,7\na.png,cat\n")
    with pytest.raises(DataError, match=r"2 bad row\(s\)[\s\S]*line 1.*did you mean 'dog'[\s\S]*line 2.*'7'"):
        load_data(f"manifest:{tmp_path / 'labels.csv'}", SPEC)
    (tmp_path / "missing.csv").write_text("a.png,cat\ngone.png,dog\n")
    data = load_data(f"manifest:{tmp_path / 'missing.csv'}", SPEC)
    assert (len(data), data.skipped) == (1, 1)
    (tmp_path / "none.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="lists no image"):
        load_data(f"manifest:{tmp_path / 'none.csv'}", SPEC)


# --- memory: the decode cache -----------------------------------------------------------------


def test_the_decode_cache_stays_within_its_bytes(tmp_path: Path) -> None:
    tree = class_tree(tmp_path, per_class=20, classes=("a", "b"))  # 40 images of 432 bytes
    data = load_data(f"folder:{tree}", SPEC, cache_bytes=10 * 432)
    for epoch in range(3):
        all_batches(data, seed=epoch)
    assert 0 < data.cache.bytes <= 10 * 432 and len(data.cache._images) == 10
    cache = DecodeCache(100)
    cache.put(0, np.zeros(101, np.uint8))  # larger than the whole cache: not kept
    assert cache.get(0) is None and cache.bytes == 0


def test_a_hosts_lazy_folder_shard_drops_its_images_between_rounds(tmp_path: Path) -> None:
    tree = class_tree(tmp_path)
    data = LazyDeviceData(f"folder:{tree}", SPEC)
    first = all_batches(data, seed=4)
    assert data.load().cache.bytes > 0
    data.release()
    assert data.load().cache.bytes == 0 and len(data) == 12 and data.class_names == CLASSES
    np.testing.assert_array_equal(all_batches(data, seed=4)[0], first[0])


# --- augmentation -----------------------------------------------------------------------------


def test_augmented_batches_are_the_same_for_a_seed_and_differ_across_seeds(tmp_path: Path) -> None:
    data = load_data(f"folder:{class_tree(tmp_path)}", SPEC)
    augment = Augment(crop_padding=2, hflip=True)

    def epoch(seed: int) -> np.ndarray:
        return all_batches(data, seed=0, augment=augment, augment_rng=np.random.default_rng(seed))[0]

    plain = all_batches(data, seed=0)[0]
    assert np.array_equal(epoch(7), epoch(7))
    assert not np.array_equal(epoch(7), epoch(8))
    assert not np.array_equal(epoch(7), plain)
    off = all_batches(data, seed=0, augment=Augment(), augment_rng=np.random.default_rng(7))[0]
    np.testing.assert_array_equal(off, plain)


def test_crop_offsets_and_flips_follow_their_distributions() -> None:
    # Prepare: an image whose pixels are all distinct, so each output reveals its offset and flip
    height, width, padding, draws = 6, 7, 3, 4000
    image = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3) + 1  # no zero pixel
    augment = Augment(crop_padding=padding, hflip=True)
    # Execute
    outputs = augment.apply([image] * draws, np.random.default_rng(0))
    found = [_offset_and_flip(out, image, padding) for out in outputs]
    # Assert: every output is a padded crop, maybe mirrored; offsets uniform on 0..2P; flips p = 0.5
    assert None not in found
    tops, lefts, flips = (np.array(column) for column in zip(*found))
    expected = draws / (2 * padding + 1)
    for offsets in (tops, lefts):
        counts = np.bincount(offsets, minlength=2 * padding + 1)
        assert counts.size == 2 * padding + 1
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 22.5, counts  # chi-square, 6 degrees of freedom: p < 0.001 to fail by chance
    assert abs(flips.mean() - 0.5) < 4 * np.sqrt(0.25 / draws)
    assert np.corrcoef(tops, lefts)[0, 1] < 0.1  # independent draws


def _offset_and_flip(out: np.ndarray, image: np.ndarray, padding: int) -> tuple[int, int, bool] | None:
    for flipped in (False, True):
        candidate = out[:, ::-1] if flipped else out
        for top in range(2 * padding + 1):
            for left in range(2 * padding + 1):
                if np.array_equal(candidate, padded_crop(image, padding, top, left)):
                    return top, left, flipped
    return None


def test_padded_crop_is_torchvisions_random_crop_window() -> None:
    image = np.arange(1, 17, dtype=np.uint8).reshape(4, 4, 1)
    window = padded_crop(image, 2, 0, 3)
    assert window[:2].max() == 0 and window[2:, :3, 0].tolist() == [[2, 3, 4], [6, 7, 8]]
    assert np.array_equal(padded_crop(image, 2, 2, 2), image)
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=65)


def test_a_plan_announces_the_augmentation() -> None:
    env = p.Envelope("run", 1, p.SERVER_ID)
    plan = p.RoundPlan(env, 1, 30.0, 1, 8, 0.01, (), crop_padding=4, hflip=True)
    assert Augment.from_plan(plan) == Augment(4, True) and Augment.from_plan(plan).describe() == \
        "random crop (padding 4), horizontal flip"
    assert not Augment.from_plan(p.RoundPlan(env, 1, 30.0, 1, 8, 0.01, ())).active


# --- the plan's classes -----------------------------------------------------------------------


def test_a_device_refuses_a_plan_whose_classes_its_data_does_not_use(tmp_path: Path) -> None:
    data = load_data(f"folder:{class_tree(tmp_path)}", SPEC)
    check_against_plan(data, 3, p.classes_digest(CLASSES))  # the same list: fine
    check_against_plan(data, 0, p.NO_CLASSES_DIGEST)  # nothing stated: nothing to check
    with pytest.raises(DataMismatchError, match=r"numbers its classes 0=cat, 1=dog, 2=owl.*classes.txt"):
        check_against_plan(data, 3, p.classes_digest(("dog", "cat", "owl")))
    with pytest.raises(DataMismatchError, match="names 3 classes, the run has 4"):
        check_against_plan(data, 4, p.classes_digest(("cat", "dog", "owl", "emu")))
    with pytest.raises(DataMismatchError, match="holds label 2 but the run's model has 2 classes"):
        check_against_plan(data, 2, p.NO_CLASSES_DIGEST)


def test_npz_shards_keep_their_class_names(tmp_path: Path) -> None:
    images = np.stack(random_images(3))
    np.savez(tmp_path / "named.npz", images=images, labels=np.array([0, 1, 1]), class_names=np.array(["x", "y"]))
    np.savez(tmp_path / "plain.npz", images=images, labels=np.array([0, 1, 1]))
    named = load_data(f"npz:{tmp_path / 'named.npz'}", SPEC)
    assert named.class_names == ("x", "y") and named.skipped == 0
    assert load_data(f"npz:{tmp_path / 'plain.npz'}", SPEC).class_names is None
    assert LazyDeviceData(f"npz:{tmp_path / 'named.npz'}", SPEC).class_names == ("x", "y")
    with pytest.raises(DataMismatchError):
        check_against_plan(named, 2, p.classes_digest(("y", "x")))


# --- npz: read image by image -----------------------------------------------------------------


def test_an_npz_shard_is_read_image_by_image_with_the_batches_of_an_in_memory_one(tmp_path: Path) -> None:
    from edge_runtime.data import DeviceData, NpzImages

    # Prepare: the same shard stored plainly (np.savez) and compressed
    images, labels = np.stack(random_images(30, (10, 10), seed=5)), np.arange(30) % 3
    np.savez(tmp_path / "plain.npz", images=images, labels=labels)
    np.savez_compressed(tmp_path / "packed.npz", images=images, labels=labels)
    reference = DeviceData(images, labels.astype(np.int64), SPEC)
    # Execute
    plain = load_data(f"npz:{tmp_path / 'plain.npz'}", SPEC, cache_bytes=5 * 300)
    packed = load_data(f"npz:{tmp_path / 'packed.npz'}", SPEC)
    # Assert: the plain file is read from disk through a bounded cache; both give the same batches
    assert isinstance(plain, NpzImages) and isinstance(packed, DeviceData)
    np.testing.assert_array_equal(plain.image(17), images[17])
    for data in (plain, packed):
        for got, want in zip(data.batches(8, np.random.default_rng(2)), reference.batches(8, np.random.default_rng(2))):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    assert 0 < plain.cache.bytes <= 5 * 300
    lazy = LazyDeviceData(f"npz:{tmp_path / 'plain.npz'}", SPEC)
    all_batches(lazy)
    lazy.release()
    assert lazy.load().cache.bytes == 0 and len(lazy) == 30
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32), labels=labels)
    with pytest.raises(DataError, match="images must be uint8"):
        load_data(f"npz:{tmp_path / 'float.npz'}", SPEC)
    np.savez(tmp_path / "short.npz", images=images, labels=labels[:10])
    with pytest.raises(DataError, match="one per image"):
        load_data(f"npz:{tmp_path / 'short.npz'}", SPEC)
