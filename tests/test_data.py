"""binwslt.data: digits split, CIFAR pickle reader (on batches written here), download + MD5, loader, augmentation."""
import hashlib
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from binwslt import data


# ------------------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_complete():
    ds = data.load_dataset("digits")
    assert ds.train_images.shape == (1437, 1, 8, 8) and ds.test_images.shape == (360, 1, 8, 8)
    assert ds.train_images.dtype == torch.uint8 and int(ds.train_images.max()) == 16
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 8
    counts = torch.bincount(ds.test_labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ~36 per class
    again = data.load_dataset("digits")
    assert torch.equal(again.train_images, ds.train_images) and torch.equal(again.test_labels, ds.test_labels)
    # the two splits together are exactly scikit-learn's 1,797 images
    from sklearn.datasets import load_digits
    every = {tuple(img.astype(np.uint8).ravel()) for img in load_digits().images}
    ours = [tuple(x.ravel().tolist()) for x in torch.cat([ds.train_images, ds.test_images])]
    assert set(ours) == every


def test_digits_normalisation_standardises_train_split():
    ds = data.load_dataset("digits")
    x = ds.normalise(ds.train_images)
    assert x.dtype == torch.float32 and x.shape == ds.train_images.shape
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1.0) < 1e-4
    assert ds.augment_default is False


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset must be one of digits, cifar10, cifar100; got 'mnist'"):
        data.load_dataset("mnist")


# -------------------------------------------------------------------------------------------------- loader


def _loader(n=10, batch=4, **kw):
    ds = data.load_dataset("digits")
    images, labels = ds.train_images[:n], torch.arange(n)
    return data.BatchLoader(ds, images, labels, batch, **kw)


def test_loader_covers_each_sample_once_and_reshuffles_per_epoch():
    loader = _loader(n=10, batch=4, shuffle=True, augment=False, seed=3)
    assert len(loader) == 3
    loader.set_epoch(0)
    first = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == list(range(10))
    loader.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in loader]), first)
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in loader]), first)
    other_seed = _loader(n=10, batch=4, shuffle=True, augment=False, seed=4)
    assert not torch.equal(torch.cat([y for _, y in other_seed]), first)
    fixed = _loader(n=10, batch=4, shuffle=False, augment=False)
    assert torch.cat([y for _, y in fixed]).tolist() == list(range(10))


def test_loader_shards_ranks_disjointly_with_padding():
    shards = []
    for rank in range(3):
        loader = _loader(n=10, batch=2, shuffle=True, augment=False, seed=1, rank=rank, world_size=3)
        loader.set_epoch(5)
        shards.append(torch.cat([y for _, y in loader]).tolist())
    assert [len(s) for s in shards] == [4, 4, 4]  # 10 padded to 12, as DistributedSampler does
    together = sum(shards, [])
    assert set(together) == set(range(10)) and len(together) == 12
    single = _loader(n=10, batch=2, shuffle=True, augment=False, seed=1)
    single.set_epoch(5)
    order = torch.cat([y for _, y in single]).tolist()
    assert shards[0] == (order + order[:2])[0::3]


def test_loader_drop_last_and_normalised_output():
    loader = _loader(n=10, batch=4, shuffle=False, augment=False, drop_last=True)
    batches = list(loader)
    assert len(loader) == 2 and [x.shape[0] for x, _ in batches] == [4, 4]
    x, _ = batches[0]
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, loader.dataset.normalise(loader.images[:4]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0), "batch_size must be a positive int"),
    (dict(rank=2, world_size=2), r"rank must be in \[0, 2\)"),
])
def test_loader_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _loader(shuffle=False, augment=False, **kwargs)


def test_random_crop_flip_matches_per_sample_definition():
    images = torch.randint(1, 256, (6, 3, 5, 7), dtype=torch.uint8)
    out = data.random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    gen = torch.Generator().manual_seed(0)
    off_y = torch.randint(0, 5, (6,), generator=gen)
    off_x = torch.randint(0, 5, (6,), generator=gen)
    flip = torch.rand(6, generator=gen) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(6):
        crop = padded[i, :, off_y[i]:off_y[i] + 5, off_x[i]:off_x[i] + 7]
        if flip[i]:
            crop = crop.flip(-1)
        assert torch.equal(out[i], crop), i
    assert flip.any() and not flip.all()  # both branches exercised with this seed


# -------------------------------------------------------------------------------------------------- CIFAR


def _write_batch(path, images, labels, label_key):
    entry = {b"batch_label": b"test", label_key: list(map(int, labels)),
             b"data": images.reshape(len(images), -1), b"filenames": [b"x.png"] * len(images)}
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def _fake_cifar(root, name="cifar10", per_batch=3, seed=0):
    spec = data.ARCHIVES[name]
    folder = os.path.join(root, spec["folder"])
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        for fname in spec[split]:
            images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
            labels = rng.integers(0, spec["num_classes"], per_batch)
            _write_batch(os.path.join(folder, fname), images, labels, spec["label_key"])
            written.setdefault(split, []).append((images, labels))
    return folder, written


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reader_on_batches_in_the_official_format(tmp_path, name, classes):
    folder, written = _fake_cifar(str(tmp_path), name)
    for where in (str(tmp_path), folder):  # the parent folder or the batches folder itself
        ds = data.load_dataset(name, data_dir=where)
        train_images = np.concatenate([b[0] for b in written["train"]])
        assert ds.num_classes == classes and ds.in_channels == 3 and ds.image_size == 32
        assert ds.train_images.shape == (len(train_images), 3, 32, 32)
        assert np.array_equal(ds.train_images.numpy(), train_images)
        assert np.array_equal(ds.train_labels.numpy(), np.concatenate([b[1] for b in written["train"]]))
        assert np.array_equal(ds.test_images.numpy(), written["test"][0][0])
        assert ds.augment_default
    # the row layout is channel-major R, G, B planes of 32x32
    raw = written["train"][0][0].reshape(3, -1)[0]
    assert ds.train_images[0, 1, 2, 3] == raw[1 * 1024 + 2 * 32 + 3]
    loader = ds.loader("train", 2, shuffle=True, seed=0)
    assert loader.augment and next(iter(loader))[0].shape == (2, 3, 32, 32)
    assert not ds.loader("test", 2, shuffle=False).augment


def test_missing_cifar_names_path_and_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "test_batch" in msg and "--download" in msg


def test_partial_cifar_lists_missing_files(tmp_path):
    folder, _ = _fake_cifar(str(tmp_path))
    os.unlink(os.path.join(folder, "data_batch_4"))
    with pytest.raises(FileNotFoundError, match="missing: data_batch_4"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))


def test_corrupt_cifar_batches_are_clear_errors(tmp_path):
    folder, _ = _fake_cifar(str(tmp_path))
    bad = os.path.join(folder, "data_batch_2")
    with open(bad, "wb") as f:
        f.write(b"\x80\x04 this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_2 is not a readable CIFAR"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR batch"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    _write_batch(bad, np.zeros((2, 3, 16, 16), np.uint8), [0, 1], b"labels")
    with pytest.raises(ValueError, match=r"shape \[N, 3072\]"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    _write_batch(bad, np.zeros((2, 3, 32, 32), np.uint8), [0, 10], b"labels")
    with pytest.raises(ValueError, match=r"labels .* must lie in \[0, 10\)"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))


def _archive(tmp_path):
    src = tmp_path / "src"
    _fake_cifar(str(src), per_batch=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    archive, md5 = _archive(tmp_path)
    spec = dict(data.ARCHIVES["cifar10"], url=archive.as_uri(), md5=md5)
    monkeypatch.setitem(data.ARCHIVES, "cifar10", spec)
    target = tmp_path / "data"
    ds = data.load_dataset("cifar10", data_dir=str(target), download=True)
    assert ds.train_images.shape == (10, 3, 32, 32)
    assert (target / "cifar-10-python.tar.gz").is_file()
    assert not [p for p in os.listdir(target) if p.endswith(".part")]


def test_download_rejects_wrong_md5(tmp_path, monkeypatch):
    archive, _ = _archive(tmp_path)
    spec = dict(data.ARCHIVES["cifar10"], url=archive.as_uri(), md5="0" * 32)
    monkeypatch.setitem(data.ARCHIVES, "cifar10", spec)
    target = tmp_path / "data"
    with pytest.raises(ValueError, match="MD5 .* expected 0{32}: the download is corrupt"):
        data.load_dataset("cifar10", data_dir=str(target), download=True)
    assert os.listdir(target) == []  # nothing half-written is left behind


def test_download_network_failure_is_clear(tmp_path, monkeypatch):
    spec = dict(data.ARCHIVES["cifar10"], url=(tmp_path / "nowhere.tar.gz").as_uri())
    monkeypatch.setitem(data.ARCHIVES, "cifar10", spec)
    with pytest.raises(RuntimeError, match="could not download"):
        data.load_dataset("cifar10", data_dir=str(tmp_path / "data"), download=True)


def test_md5sum(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert data.md5sum(str(path)) == "900150983cd24fb0d6963f7d28e17f72"
