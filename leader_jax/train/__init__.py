"""Training stages: domain pre-training, teacher, feature extraction, student."""
