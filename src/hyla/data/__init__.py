"""Data: tokenizers (and, later, corpora, token shards and packing)."""
