"""Training: configuration, the loop, checkpoints, logging, the `iecl` command line."""
