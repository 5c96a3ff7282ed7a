"""Siamese (Sentence-BERT) fine-tuning with UER-py's command line; see sbert_flax/cli/train.py.

    python train/run_classifier_siamese.py --pretrained_model_path models/google_zh_model.bin \
        --vocab_path models/google_zh_vocab.txt --config_path models/sbert/base_config.json \
        --train_path datasets/ChineseTextualInference/train.tsv \
        --dev_path datasets/ChineseTextualInference/dev.tsv \
        --learning_rate 5e-5 --epochs_num 5 --batch_size 64 --seq_length 128 --output_dir runs/nli
"""

import sys

from sbert_flax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
