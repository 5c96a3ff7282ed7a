"""UER-py checkpoint (sbert or single-tower .bin) -> sbert-flax folder.

    python convert/uer_to_flax.py MODEL.bin DEST --uer-config CONFIG.json --vocab VOCAB.txt \
        [--tower 0|1] [--pooling cls|mean|max] [--max-seq-length N] [--overwrite]

Same as `sbert-flax convert MODEL.bin DEST --uer-config ... --vocab ...`; see `sbert_flax.cli.convert`.
"""

import sys

from sbert_flax.cli.convert import convert_main

if __name__ == "__main__":
    sys.exit(convert_main(to="flax", uer=True, prog="convert/uer_to_flax.py", description=__doc__))
