"""Fashion-MNIST's files, found offline before anything is downloaded (notebooks 05, 06, 08).

The dataset class, its file names, MD5 sums and mirror come from
``torchvision.datasets.FashionMNIST``. Before downloading, bnlab looks for the four raw
``.gz`` files, in this order:

1. ``$BNLAB_DATA_DIR`` (the files themselves, or torchvision's ``FashionMNIST/raw`` below it;
   a relative path is taken from the repository's root),
2. the repository's git-ignored ``data/`` cache (where a download goes),
3. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``).

Found files are read in place (no copy), after their MD5 and SHA-256 sums are checked. A
download goes to a temporary folder first and is moved into the cache only once its sums are
right, so a failed or interrupted download never leaves a partial file behind (and the
folder of one killed mid-way is removed by the next ``make data``).

``python -m bnlab.data`` (``make data``, which ``make test`` and ``make lab`` run first) goes
further, in this order: the places above; Debian's package, installed with ``apt-get`` where
that is possible (root, apt-get present); torchvision's download, every network operation
bounded by a timeout (torchvision's downloader sets none, and an offline machine must not
hang). The whole step has one deadline (:data:`DATA_DEADLINE`): apt-get waits at most a
minute for another apt's lock, runs in its own process group and is stopped with every
process it started when its share of the time is spent. If all three fail it prints one
message naming the remedies and exits with 1.

The tensors and loaders built from these files are :mod:`bnlab.experiments.data`.
torchvision is imported on first use, not with this module: it adds about a second to
``import bnlab.data``, which the loaders do not need.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torchvision.datasets import FashionMNIST

ENV_VAR = "BNLAB_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_CACHE = REPO_ROOT / "data"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
# Seconds any one network operation (connect, read) of a download may take.
DOWNLOAD_TIMEOUT = 30.0
# Seconds the whole data step (apt-get, then a download) may take, and apt-get's share.
DATA_DEADLINE = 600.0
APT_TIMEOUT = 300.0
# apt-get waits this long for another apt's lock (dpkg's frontend lock) before giving up.
APT_LOCK_TIMEOUT = 60
# torchvision's FashionMNIST.classes, spelled out so that importing needs no torchvision
# (tests/experiments/test_datafiles.py checks that the two agree).
CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


class DataError(RuntimeError):
    """Fashion-MNIST could not be found, or a file is corrupt or truncated."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows these lines instead of a traceback: a notebook opened without the
        # data shows what to do, not twenty frames of torchvision and bnlab internals.
        return [
            f"DataError: {line}" if i == 0 else line
            for i, line in enumerate(str(self).splitlines())
        ]


def _torchvision_fashion_mnist() -> type[FashionMNIST]:
    from torchvision.datasets import FashionMNIST

    return FashionMNIST


def download_url(url: str, root: str, filename: str, md5: str) -> None:
    """torchvision's ``download_url`` (a module-level name, so tests can replace it)."""
    from torchvision.datasets.utils import download_url as fetch

    fetch(url, root=root, filename=filename, md5=md5)


def md5_table() -> dict[str, str]:
    """File name -> MD5 sum of the four raw ``.gz`` files, as torchvision knows them."""
    return dict(_torchvision_fashion_mnist().resources)


def content_md5_table() -> dict[str, str]:
    """File name -> MD5 sum of the four files' *decompressed* content.

    Debian's ``dataset-fashion-mnist`` re-gzips the release (no file name in the gzip
    header), so its ``.gz`` bytes differ from torchvision's MD5 while the data inside is the
    same; these sums of the uncompressed IDX files are the ones published alongside the
    release by several loaders, and they match Debian's files.
    """
    return dict(_CONTENT_MD5)


_CONTENT_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}


def content_sha256_table() -> dict[str, str]:
    """File name -> SHA-256 of the four files' decompressed content (beside the MD5 sums).

    Computed from Debian's ``dataset-fashion-mnist`` files, whose contents have the MD5 sums
    of :func:`content_md5_table`: the same bytes as torchvision's download.
    """
    return dict(_CONTENT_SHA256)


_CONTENT_SHA256 = {  # sha256sum of the decompressed files
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}


def search_dirs() -> list[Path]:
    """Directories searched for the raw ``.gz`` files, in order (see the module docstring)."""
    roots = [_cache_root()] + ([REPO_CACHE] if os.environ.get(ENV_VAR) else [])
    dirs = [d for root in roots for d in (root, root / "FashionMNIST" / "raw")]
    return dirs + [DEBIAN_DIR]


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path) -> None:
    """Check one raw ``.gz`` file: the SHA-256 of its content is the pinned one, and its MD5
    is torchvision's or its content's MD5 is known.

    Raises DataError naming the file when it is corrupt, truncated or not gzip at all.
    """
    name = path.name
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, md5_table()[name])
    if key in _VERIFIED:  # hashing 26 MB takes a while: once per file per process
        return
    try:
        with gzip.open(path, "rb") as f:
            content = f.read()
    except (OSError, EOFError) as err:  # EOFError: a truncated gzip stream
        problem = f"cannot be decompressed: {err}"
    else:
        sha256 = hashlib.sha256(content).hexdigest()
        md5_ok = file_md5(path) == md5_table()[name]
        md5_ok = md5_ok or hashlib.md5(content).hexdigest() == content_md5_table()[name]
        if sha256 == content_sha256_table()[name] and md5_ok:
            _VERIFIED.add(key)
            return
        problem = (
            f"content SHA-256 {sha256}, expected {content_sha256_table()[name]}"
            if md5_ok
            else f"content MD5 {hashlib.md5(content).hexdigest()}, expected "
            f"{content_md5_table()[name]}"
        )
    raise DataError(
        f"Fashion-MNIST file {path} is corrupt or truncated ({path.stat().st_size} bytes; "
        f"{problem}). Delete it and run `make data` again, reinstall "
        f"`dataset-fashion-mnist`, or point {ENV_VAR} at a good copy."
    )


_VERIFIED: set[tuple] = set()


def verify(directory: Path) -> None:
    """Check the four raw files in ``directory`` (see ``verify_file``); the first bad one raises."""
    for name in md5_table():
        verify_file(Path(directory) / name)


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in md5_table())


def locate() -> Path | None:
    """The first searched directory holding all four files, MD5-checked; None if none has them.

    A directory with all four files but a bad one raises DataError (never half-used).
    """
    for directory in search_dirs():
        if _complete(directory):
            verify(directory)
            return directory
    return None


@contextmanager
def _network_timeout(seconds: float):
    """Bound every socket operation started inside (urllib's default is to wait forever)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download(
    dest: Path | None = None, timeout: float = DOWNLOAD_TIMEOUT, deadline: float | None = None
) -> Path:
    """Download the four files into ``dest`` (default: the repo cache's torchvision layout).

    Each file is fetched into a temporary folder beside ``dest``, checked (MD5 by torchvision,
    then the content's SHA-256), and only then moved into place, so nothing partial is ever
    left in ``dest``. Every network operation gives up after ``timeout`` seconds; with
    ``deadline`` (seconds), no new file or mirror is tried once it has passed.
    """
    dest = Path(dest) if dest is not None else download_dir()
    _make_writable_dir(dest)
    remove_stale_partials(dest)
    end = None if deadline is None else time.monotonic() + deadline
    with _network_timeout(timeout):
        _download_into(dest, end)
    return dest


def download_dir() -> Path:
    """Where a download goes: below ``$BNLAB_DATA_DIR`` when it is set, else the repo cache."""
    return _cache_root() / "FashionMNIST" / "raw"


def _cache_root() -> Path:
    """``$BNLAB_DATA_DIR`` when it is set, else the repository's ``data/`` cache.

    A relative ``$BNLAB_DATA_DIR`` is taken from the repository's root, not the working
    folder: make runs there, a notebook's kernel in notebooks/, and both must find one place.
    """
    if not os.environ.get(ENV_VAR):
        return REPO_CACHE
    return REPO_ROOT / Path(os.environ[ENV_VAR]).expanduser()  # an absolute path stays as is


def _make_writable_dir(dest: Path) -> None:
    """Create ``dest`` and check a file can be written in it; a DataError says how to move it."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest):
            pass
    except OSError as err:
        raise DataError(
            f"cannot write Fashion-MNIST's files to {dest} ({err.strerror or err}); point "
            f"{ENV_VAR} at a writable folder, e.g. `export {ENV_VAR}=$HOME/data` (make data, "
            "make test and the notebooks all read it)"
        ) from err


def _download_into(dest: Path, end: float | None = None) -> None:
    for name, md5 in md5_table().items():
        if (dest / name).is_file() and file_md5(dest / name) == md5:
            continue
        errors = []
        for mirror in _torchvision_fashion_mnist().mirrors:
            if end is not None and time.monotonic() > end:
                errors.append(f"the data step's deadline passed before {mirror}{name}")
                break
            with tempfile.TemporaryDirectory(dir=dest, prefix=".partial-") as tmp:
                try:
                    download_url(mirror + name, root=tmp, filename=name, md5=md5)
                    if file_md5(Path(tmp) / name) != md5:
                        raise DataError(f"downloaded {name} from {mirror} has the wrong MD5")
                    verify_file(Path(tmp) / name)  # and the content's SHA-256
                except Exception as err:  # network errors come in many types
                    errors.append(f"{mirror}{name}: {err}")
                    continue
                os.replace(Path(tmp) / name, dest / name)
                break
        else:
            raise DownloadError("; ".join(errors))


class DownloadError(DataError):
    """No mirror delivered a file: the remedies message; ``reason`` lists each mirror's error."""

    def __init__(self, reason: str) -> None:
        super().__init__(_not_found_message(f"download failed: {reason}"))
        self.reason = reason


def _not_found_message(reason: str) -> str:
    searched = "\n".join(f"  - {d}" for d in search_dirs())
    return (
        "Fashion-MNIST was not found and could not be downloaded "
        f"({reason}).\nSearched:\n{searched}\nGet it one of three ways:\n"
        f"  1. `sudo apt install {DEBIAN_PACKAGE}` (Debian/Ubuntu, installs into {DEBIAN_DIR});\n"
        f"  2. put the four .gz files in a folder and set {ENV_VAR} to it, e.g. copied from "
        "a machine with internet where `make data` downloaded them into data/FashionMNIST/raw;\n"
        "  3. on a machine with internet access, run `make data` (downloads into the repo's "
        "data/ cache)."
    )


def ensure(allow_download: bool = True) -> Path:
    """The directory holding verified raw files: located, else downloaded, else DataError."""
    found = locate()
    if found is not None:
        return found
    if not allow_download:
        raise DataError(_not_found_message("download not allowed"))
    return download()


def read_idx(path: Path) -> torch.Tensor:
    """Read a gzip-compressed IDX file (uint8 data) into a tensor, e.g. (N, 28, 28) or (N,)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    except (OSError, EOFError, struct.error) as err:
        raise DataError(f"cannot read {path}: {err}; delete it and run `make data`") from err
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an IDX file of uint8 (magic {raw[:4].hex()})")
    body = raw[4 + 4 * ndim :]
    if len(body) != int(torch.Size(shape).numel()):
        raise DataError(f"{path} is truncated: expected shape {shape}, got {len(body)} values")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


@lru_cache(maxsize=4)
def read_split(raw_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of one split's files.

    Cached per process; do not modify the tensors in place.
    """
    # The verified .gz files are read where they lie, with bnlab's own IDX reader: torchvision's
    # dataset class would want its own folder layout (or overrides of its private methods).
    split = "train" if train else "t10k"
    images = read_idx(Path(raw_dir) / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(Path(raw_dir) / f"{split}-labels-idx1-ubyte.gz")
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise DataError(
            f"{raw_dir}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
            "do not pair up; delete the files and run `make data`"
        )
    # ToTensor's scaling, as d2l uses: float32 in [0, 1], no mean/std normalization.
    return images.unsqueeze(1).float().div_(255.0), labels.long()


def run_bounded(command: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run ``command`` in its own process group; (exit code, its output) or TimeoutError.

    On timeout the whole group is stopped (SIGTERM, then SIGKILL 10 s later): apt-get's
    children (dpkg, maintainer scripts) go with it instead of living on without it.
    """
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group (and session), which killpg reaches
    ) as proc:  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=max(timeout, 0.0))
            return proc.returncode, output
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise TimeoutError(f"`{' '.join(command)}` did not finish in time") from None


def _stop_group(proc: subprocess.Popen) -> None:
    """Signal ``proc``'s process group until its output closes: every member has exited."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.communicate(timeout=10.0)
            return
        except subprocess.TimeoutExpired:
            continue


def install_debian_package(timeout: float = APT_TIMEOUT) -> str | None:
    """``apt-get install dataset-fashion-mnist`` where possible; None on success, else why not.

    Runs only as root with apt-get on the PATH (never sudo: setup must not prompt). When the
    package is unknown because the package lists were never fetched (fresh containers), it
    runs ``apt-get update`` once and tries again. timeout: seconds for all of it; apt-get
    waits at most :data:`APT_LOCK_TIMEOUT` s for another apt to finish.
    """
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    if os.geteuid() != 0:
        return f"not root (run `sudo apt install {DEBIAN_PACKAGE}` yourself)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout

    def apt_get(*args: str) -> str | None:
        command = ["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT}", *args]
        code, output = run_bounded(command, deadline - time.monotonic(), env)
        if code == 0:
            return None
        last = output.strip().splitlines()[-1:] or ["no output"]
        return f"`{' '.join(command)}` failed: {last[0]}"

    install = ("install", "-y", "-qq", DEBIAN_PACKAGE)
    try:
        if apt_get(*install) is None:
            return None
        return apt_get("update", "-qq") or apt_get(*install)
    except TimeoutError as err:
        return (
            f"{err} (apt-get may take {timeout:g} s; stopped with every process it started; "
            "if it was installing, `sudo dpkg --configure -a` finishes what dpkg began)"
        )


def remove_stale_partials(dest: Path, older_than: float = DATA_DEADLINE) -> list[Path]:
    """Remove the ``.partial-*`` folders of downloads killed mid-way; returns those removed.

    Only folders older than ``older_than`` seconds: no data step lives that long, so a
    younger one may be another ``make data``'s download in progress.
    """
    removed = []
    for folder in Path(dest).glob(".partial-*"):
        try:
            if time.time() - folder.stat().st_mtime > older_than:
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError:
            continue  # gone already, or not ours to remove: the download works around it
    return removed


def setup_data(
    apt: bool = True,
    download_timeout: float | None = DOWNLOAD_TIMEOUT,
    deadline: float = DATA_DEADLINE,
) -> Path:
    """What ``make data`` does: locate, else install Debian's package, else download.

    ``apt=False`` skips the package; ``download_timeout=None`` skips the download;
    ``deadline``: seconds for the whole step (apt-get gets at most :data:`APT_TIMEOUT` of
    them). Prints each step it takes; raises DataError naming every remedy when all fail.
    """
    end = time.monotonic() + deadline
    remove_stale_partials(download_dir())
    found = locate()
    if found is not None:
        return found
    tried = []
    if apt:
        print(f"Fashion-MNIST not found; installing Debian's {DEBIAN_PACKAGE} with apt-get ...")
        why = install_debian_package(min(APT_TIMEOUT, end - time.monotonic()))
        found = locate()
        if found is not None:
            return found
        tried.append(f"apt-get: {why or 'installed, but the files are not in ' + str(DEBIAN_DIR)}")
    left = end - time.monotonic()
    if download_timeout is not None and left <= 1:
        tried.append(f"download: not started, the data step's deadline of {deadline:g} s passed")
    elif download_timeout is not None:
        print(
            f"downloading Fashion-MNIST (about 30 MB; {download_timeout:g} s network timeout) ..."
        )
        try:
            return download(timeout=download_timeout, deadline=left)
        except DownloadError as err:
            tried.append(f"download: {err.reason}")
    raise DataError(_not_found_message("; ".join(tried) or "nothing was tried"))


def main(argv: list[str] | None = None) -> int:
    """``python -m bnlab.data``: locate, install or download Fashion-MNIST; print where it is."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bnlab.data", description=main.__doc__)
    parser.add_argument("--no-apt", action="store_true", help=f"do not apt-get {DEBIAN_PACKAGE}")
    parser.add_argument("--no-download", action="store_true", help="do not download")
    parser.add_argument(
        "--timeout", type=float, default=DOWNLOAD_TIMEOUT, help="network timeout in seconds"
    )
    parser.add_argument(
        "--deadline", type=float, default=DATA_DEADLINE, help="seconds for the whole step"
    )
    args = parser.parse_args(argv)
    try:
        download_timeout = None if args.no_download else args.timeout
        where = setup_data(not args.no_apt, download_timeout, args.deadline)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Fashion-MNIST: {where}")
    for name in md5_table():
        print(f"  {name}  {(where / name).stat().st_size:>9} bytes  MD5 and SHA-256 ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
