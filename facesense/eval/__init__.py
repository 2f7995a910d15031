"""Evaluation: predictions over a loader, metrics, the eval report and its figures."""
