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
import sys
from array import array
from typing import Iterator, Sequence

_DIGEST_BYTES = 8
_UINT64_MAX = (1 << 64) - 1
_ROOT_MARKER = b"\x00root"
_PARENT_MARKER = b"\x01parent"
_PAGE_LEN = struct.Struct("<Q")
"""A page's length prefix: its token count, then the ids as little-endian int64."""


def hash_page(parent: int | None, token_ids: Sequence[int], extra: tuple = ()) -> int:
    """Hash one full page of ``token_ids`` chained onto ``parent`` (``None`` for the first page).

    ``extra`` may hold ``None``, bools, ints, floats, strs, bytes and nested tuples/lists of
    those. Returns an unsigned 64-bit int. The caller guarantees the page is full; this
    function does not know the page size.
    """
    h = hashlib.blake2b(_link(parent), digest_size=_DIGEST_BYTES)
    h.update(_PAGE_LEN.pack(len(token_ids)))
    h.update(_encode_ids(token_ids))
    h.update(_encode_extra(tuple(extra)))
    return int.from_bytes(h.digest(), "little")


def page_hashes(token_ids: Sequence[int], page_size: int, extra: tuple = ()) -> list[int]:
    """Chained hashes of every FULL page of ``token_ids``; a partial tail page is not hashed."""
    return list(iter_page_hashes(token_ids, page_size, extra))


def iter_page_hashes(token_ids: Sequence[int], page_size: int, extra: tuple = (),
                     parent: int | None = None) -> Iterator[int]:
    """The chained hashes of the full pages of ``token_ids``, page by page (a caller that stops at the first
    prefix-cache miss hashes no further), the first chained onto ``parent``.

    Equal to :func:`hash_page` page by page, but the token ids are encoded once, in C (about 3x faster for a
    3,000-token prompt: a session turn's prefix lookup and the router's prefix-aware routing hash whole prompts).
    Bad ids raise ``ValueError`` before the first hash.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    data = memoryview(_encode_ids(token_ids)).cast("B")
    head = _PAGE_LEN.pack(page_size)
    tail = _encode_extra(tuple(extra))
    return _chain(data, 8 * page_size, len(token_ids) // page_size, head, tail, _link(parent))


def _chain(data: memoryview, step: int, pages: int, head: bytes, tail: bytes, link: bytes) -> Iterator[int]:
    for start in range(0, pages * step, step):
        h = hashlib.blake2b(link, digest_size=_DIGEST_BYTES)
        h.update(head)
        h.update(data[start : start + step])
        h.update(tail)
        digest = h.digest()
        yield int.from_bytes(digest, "little")
        link = _PARENT_MARKER + digest


def _link(parent: int | None) -> bytes:
    """What a page's hash input starts with: the root marker, or its parent's hash."""
    if parent is None:
        return _ROOT_MARKER
    if not isinstance(parent, int) or not 0 <= parent <= _UINT64_MAX:
        raise ValueError(f"parent hash must be an unsigned 64-bit int or None, got {parent!r}")
    return _PARENT_MARKER + parent.to_bytes(8, "little")


def _encode_ids(token_ids: Sequence[int]) -> array:
    """Little-endian int64 ids (the bytes after :func:`hash_page`'s length prefix), checked in C."""
    if bool in set(map(type, token_ids)):
        raise ValueError("token ids must be ints, got bool")
    try:
        ids = array("q", token_ids)
    except TypeError as exc:
        raise ValueError(f"token ids must be ints: {exc}") from exc
    except OverflowError as exc:
        raise ValueError(f"token id out of int64 range: {exc}") from exc
    if sys.byteorder != "little":
        ids.byteswap()
    return ids


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
