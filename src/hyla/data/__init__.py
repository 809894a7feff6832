"""Data: corpora, tokenizers and chat templates, token shards, packed batches, synthetic recall tasks."""
