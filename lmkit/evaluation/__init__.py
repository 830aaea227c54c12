"""Evaluation of a trained model: corpus scoring (perplexity, bits/byte), few-shot tasks, the lm-eval backend.

The model argument is the one every verb takes: an lmkit run directory, a checkpoint inside
one, or a local Hugging Face model directory.
"""
