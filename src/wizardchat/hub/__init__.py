"""Models on the Hugging Face hub: the catalog, downloads, the cache, choosing a quant."""
