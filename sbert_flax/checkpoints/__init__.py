"""Weights in and out: hub download, `load_model`, the explicit weight maps, the HF / sentence-transformers /
UER-py / sbert-flax folder readers and writers."""
