"""sbert-flax (or HF) folder -> sentence-transformers folder (model.safetensors, modules.json, ...).

    python convert/flax_to_pytorch.py SRC DEST [--pooling cls|mean|max] [--max-seq-length N] [--overwrite]

Same as `sbert-flax convert SRC DEST --to pytorch`; see `sbert_flax.cli.convert`.
"""

import sys

from sbert_flax.cli.convert import convert_main

if __name__ == "__main__":
    sys.exit(convert_main(to="pytorch", prog="convert/flax_to_pytorch.py", description=__doc__))
