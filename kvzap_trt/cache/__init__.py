from kvzap_trt.cache.allocator import BlockAllocator
from kvzap_trt.cache.paged_cache import CacheSpec, LayerCache, PagedKVCache

__all__ = ["BlockAllocator", "CacheSpec", "LayerCache", "PagedKVCache"]
