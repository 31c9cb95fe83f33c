"""icecache.torch: decode attention with the KV in IceCache (PyTorch).

See ``icecache.torch.attention`` for the data flow. Needs python3-torch.
"""

from .attention import OffloadedKV, attention_over_pages, full_attention, page_slots_per_head

__all__ = ["OffloadedKV", "attention_over_pages", "full_attention", "page_slots_per_head"]
