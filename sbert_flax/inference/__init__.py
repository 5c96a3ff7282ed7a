"""Text in, embeddings out: host tokenization, packing, the window stream, the compiled encode programs,
`SentenceEncoder`, corpus encoding, embeddings files, quantization, prompts."""
