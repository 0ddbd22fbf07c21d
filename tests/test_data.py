import subprocess
import sys

import pytest
import torch

from dualnet import data as data_module
from dualnet.data import DataError, load_fashion_mnist, make_data, pixel_overlap_fraction

from .conftest import REPO, synthetic_arrays, write_dataset


@pytest.mark.parametrize("compress", [True, False])
def test_loader_reads_idx_files_through_torchvision(tmp_path, compress):
    written = write_dataset(tmp_path / "d", n_train=500, n_test=100, compress=compress)
    loaded = load_fashion_mnist(tmp_path / "d", download=False)
    for got, want in zip(loaded, written):
        assert torch.equal(got, torch.from_numpy(want).to(got.dtype))
    assert loaded[0].dtype == torch.uint8 and loaded[1].dtype == torch.int64
    # The files were staged into the cache in torchvision's layout, so the cache alone serves next time.
    assert (data_module.cache_dir() / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    again = load_fashion_mnist(None, download=False)
    assert torch.equal(again[0], loaded[0])


def test_env_var_names_the_folder(tmp_path, monkeypatch):
    write_dataset(tmp_path / "d", n_train=200, n_test=50)
    monkeypatch.setenv("DUALNET_DATA_DIR", str(tmp_path / "d"))
    assert len(load_fashion_mnist(download=False)[0]) == 200


def test_missing_file_is_named(tmp_path):
    write_dataset(tmp_path / "d", n_train=200, n_test=50)
    (tmp_path / "d" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"lacks .*train-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path / "d", download=False)


def test_nothing_found_without_download_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "WELL_KNOWN_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataError) as info:
        load_fashion_mnist(download=False)
    message = str(info.value)
    assert "nowhere" in message and str(data_module.cache_dir()) in message and "--data-dir" in message


@pytest.mark.parametrize("damage", ["garbage_gz", "truncated_raw", "truncated_gz", "bad_magic"])
def test_corrupt_files_are_named(tmp_path, damage):
    compress = damage != "truncated_raw"
    write_dataset(tmp_path / "d", n_train=200, n_test=50, compress=compress)
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    target = tmp_path / "d" / name
    if damage == "garbage_gz":
        target.write_bytes(b"this is not gzip at all")
    elif damage == "truncated_raw":
        target.write_bytes(target.read_bytes()[:5000])
    elif damage == "truncated_gz":
        target.write_bytes(target.read_bytes()[:-400])
    else:
        import gzip
        raw = bytearray(gzip.decompress(target.read_bytes()))
        raw[3] = 7
        target.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_fashion_mnist(tmp_path / "d", download=False)
    assert not (data_module.cache_dir() / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_cli_missing_data_is_one_line_exit_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DUALNET_CACHE_DIR": str(tmp_path / "c"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "dualnet", "train", "--data-dir", str(tmp_path / "absent"),
                           "--no-download", "--epochs", "1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "absent" in proc.stderr


def _tensors(n_train=2000, n_test=400, seed=0):
    return [torch.from_numpy(a).long() if a.ndim == 1 else torch.from_numpy(a)
            for a in synthetic_arrays(n_train, n_test, seed)]


def test_pairs_sums_and_splits():
    data = make_data(*_tensors(), val_size=300, seed=5)
    assert len(data.train) == 1700 and len(data.val) == 300 and len(data.test) == 400
    assert data.train.images.dtype == torch.uint8
    for split in (data.val, data.test):
        assert torch.equal(split.sums, split.labels + split.numbers)
        assert split.numbers.min() >= 0 and split.numbers.max() <= 9
    # Validation images come out of the training set and never overlap the training split.
    train_rows = {bytes(img.numpy()) for img in data.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in data.val.images[:50])


def test_validation_and_test_pairs_are_stable_and_seeded():
    a = make_data(*_tensors(), val_size=300, seed=1)
    b = make_data(*_tensors(), val_size=300, seed=1)
    c = make_data(*_tensors(), val_size=300, seed=2)
    assert torch.equal(a.val.numbers, b.val.numbers) and torch.equal(a.test.numbers, b.test.numbers)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.numbers, c.val.numbers)
    # A confirmation run (no validation split) and a search run score the same test pairs.
    for val_size in (0, 100, 500):
        assert torch.equal(make_data(*_tensors(), val_size=val_size, seed=1).test.numbers, a.test.numbers)


def test_training_numbers_are_redrawn_each_epoch_and_reproducible():
    data = make_data(*_tensors(), val_size=300, seed=0)
    first, second = data.train_numbers(seed=3, epoch=0), data.train_numbers(seed=3, epoch=1)
    assert not torch.equal(first, second)
    assert torch.equal(first, data.train_numbers(seed=3, epoch=0))
    assert not torch.equal(first, data.train_numbers(seed=4, epoch=0))
    # Roughly uniform over 0-9.
    counts = torch.bincount(first, minlength=10)
    assert counts.min() > 0.5 * len(first) / 10


def test_subset_and_bad_sizes():
    data = make_data(*_tensors(), val_size=300, seed=0, train_subset=100)
    assert len(data.train) == 100
    with pytest.raises(ValueError, match="val_size"):
        make_data(*_tensors(), val_size=5000)
    with pytest.raises(ValueError, match="train_subset"):
        make_data(*_tensors(), val_size=300, train_subset=10**6)
    for bad in ({"val_size": 2.5}, {"val_size": True}, {"train_subset": "500"}, {"seed": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_data(*_tensors(), **bad)


def test_images_and_labels_are_checked_before_use():
    train_images, train_labels, test_images, test_labels = _tensors()
    for args, message in (((train_images.float() / 255, train_labels, test_images, test_labels),
                           "train images must be a uint8 tensor of shape"),
                          ((train_images, train_labels, test_images.reshape(-1, 784), test_labels),
                           "test images must be a uint8 tensor of shape"),
                          ((train_images, train_labels, test_images, test_labels[:50]), "test: 400 images but 50 labels"),
                          ((train_images, train_labels + 10, test_images, test_labels), "train labels must lie in 0..9"),
                          ((train_images, train_labels.float(), test_images, test_labels), "1-d integer tensor")):
        with pytest.raises(ValueError, match=message):
            make_data(*args, val_size=300)


def test_only_a_split_with_fixed_numbers_can_be_scored():
    from dualnet import build_model, evaluate_split

    data = make_data(*_tensors(), val_size=0)
    model = build_model("late", width=4, hidden=16)
    with pytest.raises(ValueError, match="cannot score an empty split"):
        evaluate_split(model, data.val)
    with pytest.raises(ValueError, match="the training split draws them each epoch"):
        evaluate_split(model, data.train)
    assert evaluate_split(model, data.test)["n"] == 400


def test_pixel_overlap_fraction_counts_ink_in_the_last_ten_pixels():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[0, 27, 27] = 1
    images[1, 27, 17] = 255  # just outside the 10 pixels
    images[2, 26, 20] = 255  # row above
    assert pixel_overlap_fraction(images) == 0.25


def test_real_fashion_mnist_overlap_when_present():
    try:
        train_images, *_ = load_fashion_mnist(download=False)
    except DataError as exc:
        pytest.skip(f"real Fashion-MNIST not found: {exc}")
    assert train_images.shape == (60000, 28, 28)
    assert 0.5 < pixel_overlap_fraction(train_images) < 0.62


def test_pickled_data_round_trips_through_numpy_buffers():
    import pickle

    data = make_data(*_tensors(), val_size=300, seed=0)
    copy = pickle.loads(pickle.dumps(data, protocol=5))
    for name in ("train", "val", "test"):
        original, restored = getattr(data, name), getattr(copy, name)
        assert torch.equal(original.images, restored.images) and torch.equal(original.labels, restored.labels)
        assert (original.numbers is None) == (restored.numbers is None)
    # Out-of-band buffers (what Ray's object store shares between workers) carry the images.
    buffers = []
    pickle.dumps(data, protocol=5, buffer_callback=buffers.append)
    assert sum(b.raw().nbytes for b in buffers) >= data.train.images.numel()
