"""Data: a collection (metadata + adapter files) in, cached tokens, seeded splits and padded batches out."""
