"""Catalog understanding: taxonomy, zero-shot and top-tuned categorization, attributes, vector index."""
