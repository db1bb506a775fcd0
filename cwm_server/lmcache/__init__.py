"""LMCache integration: cwm as LMCache's remote storage tier (see docs/LMCACHE.md)."""
