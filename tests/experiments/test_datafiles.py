"""bnlab.experiments.datafiles and data: search order, MD5 checks, offline error, loaders.

Most tests build four small fake .gz files and patch the MD5 tables to theirs, so they
need neither the real data nor a network; one test reads the Debian package's files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers import apt_calls, fake_apt_get, gone

from bnlab.experiments import data, datafiles

NAMES = list(datafiles.md5_table())


def idx_bytes(t: torch.Tensor) -> bytes:
    """An uncompressed IDX file of uint8 data."""
    header = struct.pack(">HBB", 0, 0x08, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape)
    return header + t.to(torch.uint8).numpy().tobytes()


def fake_contents(n: int = 12) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g)
    labels = torch.arange(n) % 10
    return {
        "train-images-idx3-ubyte.gz": idx_bytes(images),
        "train-labels-idx1-ubyte.gz": idx_bytes(labels),
        "t10k-images-idx3-ubyte.gz": idx_bytes(images[: n // 2]),
        "t10k-labels-idx1-ubyte.gz": idx_bytes(labels[: n // 2]),
    }


def write_fake(directory: Path, contents: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in contents.items():
        (directory / name).write_bytes(gzip.compress(raw, mtime=0))
    return directory


def pin(monkeypatch, contents: dict[str, bytes]) -> None:
    """Patch the pinned sums (MD5 of the .gz, MD5 and SHA-256 of the content) to these files."""
    gz = {n: hashlib.md5(gzip.compress(raw, mtime=0)).hexdigest() for n, raw in contents.items()}
    plain = {n: hashlib.md5(raw).hexdigest() for n, raw in contents.items()}
    sha = {n: hashlib.sha256(raw).hexdigest() for n, raw in contents.items()}
    monkeypatch.setattr(datafiles, "md5_table", lambda: dict(gz))
    monkeypatch.setattr(datafiles, "content_md5_table", lambda: dict(plain))
    monkeypatch.setattr(datafiles, "content_sha256_table", lambda: dict(sha))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Fake sources: the pinned sums patched to the fake files, every search place in tmp_path."""
    contents = fake_contents()
    pin(monkeypatch, contents)
    monkeypatch.setattr(datafiles, "REPO_CACHE", tmp_path / "repo_data")
    monkeypatch.setattr(datafiles, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.delenv(datafiles.ENV_VAR, raising=False)
    datafiles._VERIFIED.clear()
    datafiles.read_split.cache_clear()
    yield tmp_path, contents
    datafiles._VERIFIED.clear()
    datafiles.read_split.cache_clear()


def test_finds_debian_dir(fake):
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    assert datafiles.locate() == tmp / "debian"


def test_repo_cache_in_torchvision_layout_wins_over_debian(fake):
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    write_fake(tmp / "repo_data" / "FashionMNIST" / "raw", contents)
    assert datafiles.locate() == tmp / "repo_data" / "FashionMNIST" / "raw"


def test_env_dir_wins_over_everything(fake, monkeypatch):
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    write_fake(tmp / "repo_data", contents)
    write_fake(tmp / "mine", contents)
    monkeypatch.setenv(datafiles.ENV_VAR, str(tmp / "mine"))
    assert datafiles.locate() == tmp / "mine"
    assert datafiles.search_dirs()[0] == tmp / "mine"


def test_a_relative_data_dir_is_taken_from_the_repository_root(fake, monkeypatch, tmp_path):
    """make runs from the repository's root, a notebook's kernel from notebooks/: one place."""
    monkeypatch.setenv(datafiles.ENV_VAR, "my-data")
    seen = set()
    for cwd in (tmp_path, tmp_path / "debian"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        seen.add((datafiles.search_dirs()[0], datafiles.download_dir()))
    assert seen == {(datafiles.REPO_ROOT / "my-data",
                     datafiles.REPO_ROOT / "my-data" / "FashionMNIST" / "raw")}  # fmt: skip


def test_incomplete_dir_is_skipped(fake):
    tmp, contents = fake
    write_fake(tmp / "repo_data", {k: v for k, v in contents.items() if "t10k" not in k})
    write_fake(tmp / "debian", contents)
    assert datafiles.locate() == tmp / "debian"


def test_recompressed_file_is_accepted_by_content_md5(fake):
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    # a different gzip header (a stored file name), as Debian's repacking changes the bytes
    path = tmp / "debian" / NAMES[0]
    with gzip.GzipFile(filename="x", mode="wb", fileobj=open(path, "wb"), mtime=1) as f:
        f.write(contents[NAMES[0]])
    assert hashlib.md5(path.read_bytes()).hexdigest() != datafiles.md5_table()[NAMES[0]]
    assert datafiles.locate() == tmp / "debian"


def test_corrupt_file_is_named(fake):
    tmp, contents = fake
    bad = dict(contents)
    bad[NAMES[1]] = contents[NAMES[1]][:-1] + b"\x07"  # one label changed
    write_fake(tmp / "debian", bad)
    with pytest.raises(datafiles.DataError, match=f"{NAMES[1]}.*corrupt or truncated"):
        datafiles.locate()


def test_a_file_whose_sha256_differs_is_refused_even_when_its_md5_matches(fake, monkeypatch):
    """Integrity does not rest on MD5 alone: the content's SHA-256 is pinned beside it."""
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    pinned = dict(datafiles.content_sha256_table(), **{NAMES[2]: "0" * 64})
    monkeypatch.setattr(datafiles, "content_sha256_table", lambda: pinned)
    with pytest.raises(datafiles.DataError, match=f"{NAMES[2]}.*content SHA-256"):
        datafiles.locate()


def test_truncated_file_is_named(fake):
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    path = tmp / "debian" / NAMES[0]
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(datafiles.DataError, match=f"{NAMES[0]}.*cannot be decompressed"):
        datafiles.ensure(allow_download=False)


def test_offline_error_names_the_three_remedies(fake, monkeypatch):
    def no_network(url, root, filename, md5):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datafiles, "download_url", no_network)
    with pytest.raises(datafiles.DataError) as info:
        datafiles.ensure()
    message = str(info.value)
    for remedy in ("make data", "apt install dataset-fashion-mnist", datafiles.ENV_VAR):
        assert remedy in message
    assert "name resolution" in message


def test_download_moves_only_verified_files_into_place(fake, monkeypatch):
    tmp, contents = fake

    def fetch(url, root, filename, md5):
        Path(root, filename).write_bytes(gzip.compress(contents[filename], mtime=0))

    monkeypatch.setattr(datafiles, "download_url", fetch)
    where = datafiles.ensure()
    assert where == tmp / "repo_data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in where.iterdir()) == sorted(NAMES)
    assert datafiles.locate() == where


def test_interrupted_download_leaves_no_partial_file(fake, monkeypatch):
    tmp, contents = fake

    def half(url, root, filename, md5):
        Path(root, filename).write_bytes(b"\x1f\x8b partial")
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(datafiles, "download_url", half)
    with pytest.raises(datafiles.DataError, match="connection reset"):
        datafiles.ensure()
    dest = tmp / "repo_data" / "FashionMNIST" / "raw"
    assert list(dest.iterdir()) == []


def test_wrong_md5_download_is_rejected(fake, monkeypatch):
    tmp, contents = fake

    def wrong(url, root, filename, md5):
        Path(root, filename).write_bytes(gzip.compress(b"not the data", mtime=0))

    monkeypatch.setattr(datafiles, "download_url", wrong)
    with pytest.raises(datafiles.DataError, match="wrong MD5"):
        datafiles.ensure()
    assert list((tmp / "repo_data" / "FashionMNIST" / "raw").iterdir()) == []


def test_loaders_from_fake_files(fake):
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    d = data.fashion_mnist(batch_size=5, fast=False)
    x, y = next(iter(d.test))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = torch.frombuffer(bytearray(contents[NAMES[2]][16:]), dtype=torch.uint8)
    assert torch.equal(x.flatten(), raw[: 5 * 784].float() / 255)
    assert [len(b[1]) for b in d.train] == [5, 5, 2]
    assert len(d.train) == 3


def test_shuffling_is_seeded_and_covers_everything():
    x, y = torch.arange(10).float(), torch.arange(10)
    loader = data.TensorLoader(x, y, batch_size=4, shuffle=True, seed=3)
    first = torch.cat([b[1] for b in loader])
    second = torch.cat([b[1] for b in loader])
    loader.reseed(3)
    again = torch.cat([b[1] for b in loader])
    assert sorted(first.tolist()) == list(range(10))
    assert not torch.equal(first, second)  # a new permutation each epoch
    assert torch.equal(first, again)


def test_fast_subset_sizes(fake, monkeypatch):
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    monkeypatch.setattr(data, "FAST_TRAIN", 7)
    monkeypatch.setattr(data, "FAST_TEST", 3)
    monkeypatch.setenv("BNLAB_FAST", "1")
    d = data.fashion_mnist(batch_size=4)
    assert (len(d.train.x), len(d.test.x)) == (7, 3)
    monkeypatch.setenv("BNLAB_FAST", "0")
    d = data.fashion_mnist(batch_size=4)
    assert (len(d.train.x), len(d.test.x)) == (12, 6)
    assert len(data.fashion_mnist(n_train=5, fast=False).train.x) == 5


@pytest.mark.skipif(
    not datafiles.DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_debian_package_files_are_accepted(monkeypatch):
    monkeypatch.delenv(datafiles.ENV_VAR, raising=False)
    monkeypatch.setattr(datafiles, "REPO_CACHE", Path("/nonexistent/bnlab-cache"))
    assert datafiles.locate() == datafiles.DEBIAN_DIR
    for name in NAMES:  # the pinned sums are those of the contents, as Debian re-compresses
        with gzip.open(datafiles.DEBIAN_DIR / name) as f:
            content = f.read()
        assert hashlib.sha256(content).hexdigest() == datafiles.content_sha256_table()[name]
        assert hashlib.md5(content).hexdigest() == datafiles.content_md5_table()[name]
    x, y = data.load_tensors(train=False)
    assert x.shape == (10000, 1, 28, 28) and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [1000] * 10


def test_cli_prints_the_location(fake, capsys):
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    assert datafiles.main([]) == 0
    assert str(tmp / "debian") in capsys.readouterr().out


def test_classes_are_torchvisions_and_import_needs_no_torchvision():
    import subprocess
    import sys

    from torchvision.datasets import FashionMNIST

    assert datafiles.CLASSES == list(FashionMNIST.classes)
    probe = "import sys, bnlab.experiments.data; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # torchvision is imported on first use only


# --- make data: locate, else Debian's package, else a download with a timeout ---------


def test_setup_data_installs_the_debian_package_before_downloading(fake, monkeypatch):
    tmp, contents = fake
    calls = []
    monkeypatch.setattr(
        datafiles,
        "install_debian_package",
        lambda _s: write_fake(tmp / "debian", contents) and None,
    )
    monkeypatch.setattr(datafiles, "download_url", lambda *a, **k: calls.append(a))
    assert datafiles.setup_data() == tmp / "debian"
    assert calls == []  # found after apt: nothing downloaded


def test_setup_data_downloads_when_apt_cannot_help(fake, monkeypatch):
    tmp, contents = fake
    monkeypatch.setattr(datafiles, "install_debian_package", lambda _s: "not root")

    def fetch(url, root, filename, md5):
        Path(root, filename).write_bytes(gzip.compress(contents[filename], mtime=0))

    monkeypatch.setattr(datafiles, "download_url", fetch)
    assert datafiles.setup_data() == tmp / "repo_data" / "FashionMNIST" / "raw"


def test_setup_data_failure_is_one_message_with_every_remedy(fake, monkeypatch, capsys):
    monkeypatch.setattr(datafiles, "install_debian_package", lambda _s: "apt-get is not available")

    def offline(url, root, filename, md5):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(datafiles, "download_url", offline)
    assert datafiles.main([]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: Fashion-MNIST was not found") and "Traceback" not in err
    for said in ("apt-get is not available", "Name or service not known", "make data",
                 "apt install dataset-fashion-mnist", datafiles.ENV_VAR):  # fmt: skip
        assert said in err, said


def test_cli_flags_skip_apt_and_download(fake, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("skipped step ran")

    monkeypatch.setattr(datafiles, "install_debian_package", must_not_run)
    monkeypatch.setattr(datafiles, "download_url", must_not_run)
    assert datafiles.main(["--no-apt", "--no-download"]) == 1
    assert "nothing was tried" in capsys.readouterr().err


def test_download_bounds_every_network_operation(fake, monkeypatch):
    seen = []

    def fetch(url, root, filename, md5):
        import socket

        seen.append(socket.getdefaulttimeout())
        raise TimeoutError("timed out")

    monkeypatch.setattr(datafiles, "download_url", fetch)
    before = __import__("socket").getdefaulttimeout()
    with pytest.raises(datafiles.DataError, match="timed out"):
        datafiles.download(timeout=7.5)
    assert seen and set(seen) == {7.5}
    assert __import__("socket").getdefaulttimeout() == before  # restored


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """A folder whose apt-get stand-in (tests/helpers.py) comes first on the PATH, as root."""
    folder = tmp_path / "apt"
    folder.mkdir()
    for name, value in fake_apt_get(folder).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setattr(datafiles.os, "geteuid", lambda: 0)
    return folder


def test_apt_install_refreshes_package_lists_once_and_waits_for_the_lock_60_s(fake_apt):
    assert datafiles.install_debian_package() is None
    lock = "-o DPkg::Lock::Timeout=60"
    assert apt_calls(fake_apt) == [
        f"{lock} install -y -qq dataset-fashion-mnist",
        f"{lock} update -qq",
        f"{lock} install -y -qq dataset-fashion-mnist",
    ]


def test_apt_that_fails_says_why(fake_apt):
    (fake_apt / "apt-get").write_text(
        "#!/bin/sh\necho \"E: Could not resolve 'deb.debian.org'\" >&2\nexit 100\n"
    )
    assert "Could not resolve" in datafiles.install_debian_package()


def test_apt_past_its_time_is_killed_with_every_process_it_started(fake_apt):
    """apt-get runs in its own process group; on timeout the whole group goes (dpkg too)."""
    (fake_apt / "hang").touch()
    why = datafiles.install_debian_package(timeout=0.5)
    assert "did not finish" in why and "apt-get may take 0.5 s" in why, why
    assert "dpkg --configure -a" in why
    pids = [int(p) for p in (fake_apt / "pids").read_text().split()]
    assert len(pids) == 2 and gone(pids), "apt-get or its child outlived the timeout"
    assert apt_calls(fake_apt) == ["-o DPkg::Lock::Timeout=60 install -y -qq dataset-fashion-mnist"]


def test_the_whole_data_step_has_one_deadline(fake, fake_apt, monkeypatch):
    """apt cut off at the deadline, and no download started after it."""
    (fake_apt / "hang").touch()
    monkeypatch.setattr(datafiles, "download_url", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(datafiles.DataError) as err:
        datafiles.setup_data(deadline=0.5)
    message = str(err.value)
    assert "did not finish" in message and "deadline" in message, message
    assert "finished" not in apt_calls(fake_apt)


def test_apt_install_needs_root_and_apt(monkeypatch):
    monkeypatch.setattr(datafiles.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(datafiles.os, "geteuid", lambda: 1000)
    assert "sudo apt install dataset-fashion-mnist" in datafiles.install_debian_package()
    monkeypatch.setattr(datafiles.shutil, "which", lambda name: None)
    assert datafiles.install_debian_package() == "apt-get is not available"


def test_stale_partial_downloads_are_removed_at_start(fake):
    """A download killed mid-way leaves its .partial- folder; a live one is left alone."""
    tmp, contents = fake
    write_fake(tmp / "debian", contents)
    dest = datafiles.download_dir()
    stale, live = dest / ".partial-old", dest / ".partial-new"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / NAMES[0]).write_bytes(b"half a file")
    old = stale.stat().st_mtime - datafiles.DATA_DEADLINE - 60
    os.utime(stale, (old, old))
    assert datafiles.setup_data() == tmp / "debian"
    assert not stale.exists() and live.exists()


def test_a_notebook_shows_the_remedies_not_a_traceback(capsys):
    """IPython renders DataError as its message alone (``_render_traceback_``)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.user_ns["DataError"] = datafiles.DataError
    result = shell.run_cell("raise DataError('Fashion-MNIST was not found.\\n  1. remedy')")
    shown = capsys.readouterr().out
    assert isinstance(result.error_in_exec, datafiles.DataError)
    assert "DataError: Fashion-MNIST was not found." in shown and "  1. remedy" in shown
    assert "Traceback" not in shown and "File " not in shown and "---" not in shown


def test_images_and_labels_that_do_not_pair_up_are_refused(fake, monkeypatch):
    tmp, contents = fake
    contents = dict(contents, **{NAMES[1]: idx_bytes(torch.arange(5) % 10)})  # 5 labels, 12 images
    pin(monkeypatch, contents)
    write_fake(tmp / "debian", contents)
    with pytest.raises(datafiles.DataError, match="do not pair up"):
        data.load_tensors(train=True)


def test_an_unwritable_cache_names_the_folder_and_bnlab_data_dir(fake, monkeypatch):
    tmp, _ = fake
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")  # mkdir below a file fails, even for root
    monkeypatch.setenv(datafiles.ENV_VAR, str(blocker / "data"))
    assert datafiles.download_dir() == blocker / "data" / "FashionMNIST" / "raw"
    with pytest.raises(datafiles.DataError) as err:
        datafiles.download()
    message = str(err.value)
    assert str(blocker / "data") in message and "BNLAB_DATA_DIR" in message
    assert not isinstance(err.value, OSError)
