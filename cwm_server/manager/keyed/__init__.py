"""KeyedChunkService's domain: values under opaque keys (a KV engine's remote tier), stored as
cwm chunks: `chunks` (the service), `put` (one put stream), `checks` (what it accepts)."""
