"""Image-classification competition pipeline: folds, train, rebalance, infer, ensemble."""

__version__ = "0.1.0"
