"""The training application's parts: config, optimisation, mixing, averaging, checkpoints, metrics."""
