"""Inference on ordinary pictures: faces, the classifier, predict, export."""
