"""Feature stores and FAISS indexes (see build_index)."""
