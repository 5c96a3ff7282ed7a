"""Siamese fine-tuning (UER-py's finetune/run_classifier_siamese.py recipe) in JAX."""
