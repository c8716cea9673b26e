"""How right: attribution quality (LDS, mislabeled detection, retraining, cross-source) and score error."""
