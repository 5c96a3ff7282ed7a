"""sbert-flax: Chinese Sentence-BERT (uer/sbert-base-chinese-nli) in JAX / Flax NNX."""

from sbert_flax.config import BertConfig, PoolingConfig
from sbert_flax.embedder import SentenceEmbedder
from sbert_flax.encoder import SentenceEncoder, enable_compilation_cache
from sbert_flax.loading import DEFAULT_MODEL, LoadedModel, load_model
from sbert_flax.model import BertModel

__all__ = ["DEFAULT_MODEL", "BertConfig", "BertModel", "LoadedModel", "PoolingConfig",
           "SentenceEmbedder", "SentenceEncoder", "enable_compilation_cache", "load_model"]
__version__ = "0.2.0"
