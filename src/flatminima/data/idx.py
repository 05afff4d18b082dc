"""Reader for the IDX format of MNIST and Fashion-MNIST.

The format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, one byte dtype code,
one byte ``ndim``, then ``ndim`` big-endian ``uint32`` sizes ``d_1..d_ndim``, then the payload of
``prod(d_k) * itemsize`` big-endian values in C order.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "write_idx"]

logger = logging.getLogger(__name__)

# dtype code -> big-endian numpy dtype
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Read ``path``, transparently gunzipping it when it starts with the gzip magic number."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        if path.suffix == ".gz":
            raise ValueError(
                f"{path}: not a gzip file (name ends in .gz but the gzip magic is missing)"
            )
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise ValueError(
            f"{path}: corrupt gzip data ({err}); delete the file and fetch it again"
        ) from err


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (raw or gzipped) into a tensor of shape ``(d_1, ..., d_ndim)``.

    Checks the magic number (``0x00 0x00 code ndim``), the dtype ``code`` and that the payload
    holds exactly ``prod(d_k) * itemsize`` bytes.

    Args:
        path: the ``.idx?-ubyte`` file, optionally ``.gz`` compressed (detected by content).

    Returns:
        A tensor in native byte order with the file's dtype (``uint8`` for MNIST).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: corrupt gzip data, wrong magic number, unknown dtype code, or a payload whose
            length differs from the product of the dimensions (the message names the file and
            the expected and found byte counts).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes, need >= 4)")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"{path}: wrong IDX magic number 0x{data[:4].hex()} (must start with 0x0000); "
            "is this an IDX file?"
        )
    if code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X} (valid: {valid})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header: expected {header_len} bytes for {ndim} dimensions, "
            f"found {len(data)}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        raise ValueError(
            f"{path}: IDX payload length mismatch for shape {tuple(dims)}: expected {expected} "
            f"bytes, found {found} (truncated or corrupt file)"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    arr = arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writable
    logger.debug("read %s: shape %s dtype %s", path, tuple(dims), arr.dtype)
    return torch.from_numpy(arr)


def write_idx(path: str | os.PathLike, array: torch.Tensor | np.ndarray) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``.

    The inverse of :func:`read_idx`, used to export data and to build test fixtures.

    Args:
        path: destination file.
        array: tensor or array of dtype uint8, int8, int16, int32, float32 or float64.

    Raises:
        ValueError: unsupported dtype or a 0-dimensional array.
    """
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.ndim == 0:
        raise ValueError("write_idx needs an array with at least one dimension")
    native = {np.dtype(d.newbyteorder("=")): c for c, d in _IDX_DTYPES.items()}
    if arr.dtype not in native:
        raise ValueError(
            f"write_idx: unsupported dtype {arr.dtype} (valid: uint8, int8, int16, int32, "
            "float32, float64)"
        )
    code = native[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = np.ascontiguousarray(arr, dtype=_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    blob = header + payload
    if path.suffix == ".gz":
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path
