"""Evaluators run from `config.evals`: panoptic quality, depth metrics, colorization FID."""
