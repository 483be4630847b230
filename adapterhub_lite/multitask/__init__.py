"""Multi-task learning: loss weighting and task sampling rules for joint adapter training."""
