"""Search: adapter embeddings in, a cosine index and the `w2t-embed` / `w2t-search` commands out."""
