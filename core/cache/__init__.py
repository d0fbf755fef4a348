"""Paged KV cache bookkeeping (pure Python: no torch, no numpy).

- :mod:`.prefix`: stable chained hashes of full pages.
- :mod:`.allocator`: page ids, reference counts, free queue, LRU of evictable cached pages.
- :mod:`.manager`: per-request page tables, prefix hits, pinned sessions, transfer hooks.
"""

from .allocator import CacheIntegrityError, PageAllocator
from .manager import CacheUsage, KVCacheBlocks, KVCacheManager
from .prefix import hash_page, page_hashes

__all__ = [
    "CacheIntegrityError",
    "CacheUsage",
    "KVCacheBlocks",
    "KVCacheManager",
    "PageAllocator",
    "hash_page",
    "page_hashes",
]
