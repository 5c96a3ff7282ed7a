"""Using embeddings: exact search (one running top-k), retrieval and STS evaluation, hard-negative mining."""
