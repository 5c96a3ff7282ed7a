"""HF / sentence-transformers folder -> sbert-flax folder.

    python convert/pytorch_to_flax.py SRC DEST [--pooling cls|mean|max] [--max-seq-length N] [--overwrite]

Same as `sbert-flax convert SRC DEST`; see `sbert_flax.cli.convert`.
"""

import sys

from sbert_flax.cli.convert import convert_main

if __name__ == "__main__":
    sys.exit(convert_main(to="flax", prog="convert/pytorch_to_flax.py", description=__doc__))
