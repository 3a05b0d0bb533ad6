"""Training: a Hydra config in (the one place that instantiates), a fitted model, metrics.json and plots out."""
