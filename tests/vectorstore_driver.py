"""An upload the kill test interrupts: `python tests/vectorstore_driver.py MODEL CORPUS URI
COLLECTION LOG BATCH STALL_AFTER`.

Uploads the lines of CORPUS with `vectorstore.upload` in batches of BATCH. A hook on the encoder
appends the size of each encoded batch to LOG (so the test sees how far it got) and, after
STALL_AFTER batches, stops the run from finishing (the test's SIGKILL ends it): the kill lands
mid-upload however slowly the machine runs.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
    model, corpus, uri, collection, log, batch, stall_after = sys.argv[1:8]
    import jax

    from sbert_flax.common.files import read_text_lines
    from sbert_flax.inference.encoder import SentenceEncoder
    from sbert_flax.retrieval import vectorstore

    enc = SentenceEncoder.from_pretrained(model, devices=jax.devices()[:1])
    encode, batches = enc.encode, []

    def logged_encode(texts, **kwargs):
        out = encode(texts, **kwargs)
        batches.append(len(texts))
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{len(texts)}\n")
        if len(batches) > int(stall_after):
            time.sleep(600)  # never returns before the kill
        return out

    enc.encode = logged_encode
    vectorstore.upload(enc, read_text_lines(corpus), uri, collection, batch_size=int(batch),
                       progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
