"""Training: config, the loop, optimisation, checkpoints, distributed runs, ReSAE fit, meta-SAE, error-predictor fit."""
