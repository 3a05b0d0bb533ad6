"""Training: a Hydra config in (the one place that instantiates), a fitted model, metrics.json and plots out."""
from w2t.train import resolvers  # noqa: F401  registered on import: the configs interpolate them
