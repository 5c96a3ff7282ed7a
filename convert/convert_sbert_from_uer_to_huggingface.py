"""UER-py sbert checkpoint -> Hugging Face BertModel state dict (the model card's second command).

    python convert/convert_sbert_from_uer_to_huggingface.py --input_model_path models/finetuned_model.bin \
        --output_model_path pytorch_model.bin --layers_num 12

Same arguments, defaults and output as UER-py's scripts/convert_sbert_from_uer_to_huggingface.py
(tower 0, HF key names without `bert.`, UER's padding-segment row dropped, torch.save); see
`sbert_flax.checkpoints.uer`. Needs torch.
"""

import argparse
import sys

from sbert_flax.checkpoints.uer_sbert_to_hf import convert_sbert_from_uer_to_huggingface
from sbert_flax.checkpoints.weight_maps import WeightsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input_model_path", type=str, default="models/input_model.bin",
                        help="UER-py siamese (sbert) checkpoint")
    parser.add_argument("--output_model_path", type=str, default="models/output_model.bin",
                        help="where the HF BertModel state dict is written (torch.save)")
    parser.add_argument("--layers_num", type=int, default=12,
                        help="transformer layers; must equal the checkpoint's")
    args = parser.parse_args(argv)
    try:
        hf = convert_sbert_from_uer_to_huggingface(args.input_model_path, args.output_model_path,
                                                   args.layers_num)
    except (FileNotFoundError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(hf)} tensors (tower 0, {args.layers_num} layers) to {args.output_model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
