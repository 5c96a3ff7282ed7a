"""sbert-flax: Chinese Sentence-BERT (uer/sbert-base-chinese-nli) in JAX / Flax NNX."""

from sbert_flax.config import BertConfig, PoolingConfig
from sbert_flax.encoder import SentenceEncoder
from sbert_flax.model import BertModel

__all__ = ["BertConfig", "BertModel", "PoolingConfig", "SentenceEncoder"]
__version__ = "0.1.0"
