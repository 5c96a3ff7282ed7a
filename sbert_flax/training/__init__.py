"""Fine-tuning in JAX: UER-py's siamese softmax recipe (finetune/run_classifier_siamese.py) and
the contrastive losses (MultipleNegativesRankingLoss, its cached GradCache form, CoSENT; any of
them Matryoshka), sharded over a device mesh."""
