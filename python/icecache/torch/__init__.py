"""icecache.torch: decode attention with the KV in IceCache (see attention.py)."""
