"""Checksummed downloads of the standard data-set files.

Downloads happen only when asked (``download=True``); they fail fast (short timeout) when offline
and then say how to obtain the files by hand. Every downloaded file is verified against a known
MD5 or SHA-256 digest; a mismatch deletes the file and raises.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DownloadError",
    "RemoteFile",
    "REMOTE_FILES",
    "file_digest",
    "verify_checksum",
    "download_file",
    "extract_tar",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0


class DownloadError(OSError):
    """A download failed (network unavailable, HTTP error) or was refused."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: candidate ``urls`` (mirrors, tried in order) and its digest."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None


def _idx_files(bases: tuple[str, ...], md5s: dict[str, str]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(f, tuple(b + f for b in bases), md5=m) for f, m in md5s.items())


# Digests as published by the data-set authors (and used by torchvision).
REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": _idx_files(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "mnist": _idx_files(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            md5="c58f30108f718f92721af3b95e74349a",
        ),
    ),
    "cifar100": (
        RemoteFile(
            "cifar-100-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
            md5="eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ),
}


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(
    path: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None
) -> None:
    """Check ``path`` against the given digest(s); on mismatch delete it and raise.

    Raises:
        ValueError: no digest given, or a digest differs (the message names the file, the
            expected and the actual digest).
    """
    path = Path(path)
    if md5 is None and sha256 is None:
        raise ValueError(f"verify_checksum({path}): give md5= or sha256=")
    for algo, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = file_digest(path, algo)
        if actual.lower() != expected.lower():
            path.unlink(missing_ok=True)
            raise ValueError(
                f"{path}: {algo} checksum mismatch: expected {expected.lower()}, got {actual} "
                "(file deleted; the download was corrupt or the mirror changed)"
            )


def _fetch(
    url: str,
    dest: Path,
    timeout: float,
    progress: Callable[[int, int | None], None] | None = None,
) -> None:
    """Stream ``url`` to ``dest`` (file:// URLs work too). Separate so tests can replace it.

    ``progress(bytes_done, bytes_total_or_None)`` is called after every chunk.
    """
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        if progress is None:
            shutil.copyfileobj(resp, out, length=1 << 20)
            return
        length = resp.headers.get("Content-Length") if resp.headers else None
        total = int(length) if length and length.isdigit() else None
        done = 0
        progress(done, total)
        for chunk in iter(lambda: resp.read(1 << 16), b""):
            out.write(chunk)
            done += len(chunk)
            progress(done, total)


def download_file(
    remote: RemoteFile,
    folder: str | os.PathLike,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    how_to: str = "",
    progress: Callable[[str, int, int | None], None] | None = None,
) -> Path:
    """Download ``remote`` into ``folder`` (trying each mirror) and verify its digest.

    An existing file with the right digest is reused. The data goes to a ``.part`` file that is
    renamed only after the digest matched.

    Args:
        remote: what to fetch.
        folder: destination folder (created if needed).
        timeout: socket timeout per attempt in seconds.
        how_to: extra text for the error message (how to obtain the file by hand).
        progress: called as ``progress(filename, bytes_done, bytes_total_or_None)``.

    Raises:
        DownloadError: every mirror failed (offline, HTTP error).
        ValueError: the digest did not match (the partial file is deleted).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / remote.filename
    if dest.is_file():
        try:
            verify_checksum(dest, md5=remote.md5, sha256=remote.sha256)
            logger.info("reusing verified %s", dest)
            return dest
        except ValueError:
            logger.warning("existing %s has a wrong checksum; downloading it again", dest)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in remote.urls:
        logger.info("downloading %s -> %s", url, dest)
        try:
            if progress is None:
                _fetch(url, part, timeout)
            else:
                _fetch(url, part, timeout, lambda d, t: progress(remote.filename, d, t))
        except (OSError, urllib.error.URLError, ValueError) as err:
            part.unlink(missing_ok=True)
            errors.append(f"{url}: {err}")
            continue
        try:
            verify_checksum(part, md5=remote.md5, sha256=remote.sha256)
        except ValueError as err:
            raise ValueError(str(err).replace(str(part), f"{dest} (from {url})")) from None
        part.replace(dest)
        return dest
    raise DownloadError(
        f"could not download {remote.filename}: "
        + "; ".join(errors)
        + (f". {how_to}" if how_to else "")
    )


def extract_tar(archive: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Extract a ``.tar.gz`` into ``folder``, refusing members that escape it.

    Raises:
        ValueError: a member has an absolute path, ``..`` component or is a link outside.
    """
    archive, folder = Path(archive), Path(folder)
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(folder, filter="data")
            except tarfile.FilterError as err:
                raise ValueError(f"{archive}: unsafe member refused ({err})") from err
            return
        root = folder.resolve()
        for m in tar.getmembers():  # pragma: no cover - Python < 3.11.4
            target = (folder / m.name).resolve()
            if root != target and root not in target.parents or m.issym() or m.islnk():
                raise ValueError(f"{archive}: unsafe member {m.name!r} refused")
        tar.extractall(folder)  # pragma: no cover
