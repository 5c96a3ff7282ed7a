"""The model: frozen configs, the NNX BERT backbone, pooling, `SentenceEmbedder`, splash attention."""
