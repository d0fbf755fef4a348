"""Chained content hashes of full KV pages, for prefix caching.

A page's hash covers its parent page's hash, its own token ids and an optional ``extra``
tuple (for example a model id or adapter name), so two pages hash equal only when the
whole prefix up to and including them is equal. Hashes are 64-bit integers from
``hashlib.blake2b`` over a canonical byte encoding: stable across processes, runs and
machines (Python's ``hash()`` is salted per process and must never be used here), so prefill
workers can publish them and a router can compare them.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

_DIGEST_BYTES = 8
_UINT64_MAX = (1 << 64) - 1
_ROOT_MARKER = b"\x00root"
_PARENT_MARKER = b"\x01parent"


def hash_page(parent: int | None, token_ids: Sequence[int], extra: tuple = ()) -> int:
    """Hash one full page of ``token_ids`` chained onto ``parent`` (``None`` for the first page).

    ``extra`` may hold ``None``, bools, ints, floats, strs, bytes and nested tuples/lists of
    those. Returns an unsigned 64-bit int. The caller guarantees the page is full; this
    function does not know the page size.
    """
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    if parent is None:
        h.update(_ROOT_MARKER)
    else:
        if not isinstance(parent, int) or not 0 <= parent <= _UINT64_MAX:
            raise ValueError(f"parent hash must be an unsigned 64-bit int or None, got {parent!r}")
        h.update(_PARENT_MARKER + parent.to_bytes(8, "little"))
    h.update(_encode_tokens(token_ids))
    h.update(_encode_extra(tuple(extra)))
    return int.from_bytes(h.digest(), "little")


def page_hashes(token_ids: Sequence[int], page_size: int, extra: tuple = ()) -> list[int]:
    """Chained hashes of every FULL page of ``token_ids``; a partial tail page is not hashed."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        parent = hash_page(parent, token_ids[start : start + page_size], extra)
        hashes.append(parent)
    return hashes


def _encode_tokens(token_ids: Sequence[int]) -> bytes:
    """Length-prefixed little-endian int64 encoding of the token ids."""
    ids = list(token_ids)
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise ValueError(f"token ids must be ints, got {type(tok).__name__}")
    try:
        return struct.pack(f"<Q{len(ids)}q", len(ids), *ids)
    except struct.error as exc:
        raise ValueError(f"token id out of int64 range: {exc}") from exc


def _encode_extra(value: object) -> bytes:
    """Canonical, type-tagged, length-prefixed bytes for ``value`` (an ``extra`` element)."""
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"B1" if value else b"B0"
    if isinstance(value, int):
        return _tagged(b"I", str(value).encode("ascii"))
    if isinstance(value, float):
        return b"F" + struct.pack("<d", value)
    if isinstance(value, str):
        return _tagged(b"S", value.encode("utf-8"))
    if isinstance(value, bytes):
        return _tagged(b"Y", value)
    if isinstance(value, (tuple, list)):
        return _tagged(b"T", b"".join(_encode_extra(item) for item in value))
    raise ValueError(f"unsupported type in page hash extra: {type(value).__name__}")


def _tagged(tag: bytes, payload: bytes) -> bytes:
    return tag + len(payload).to_bytes(8, "little") + payload
