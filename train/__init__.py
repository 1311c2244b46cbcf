"""Training: the configuration and what is built from it (`config`,
`factory`), the step (`step`), the loop and its bookkeeping (`loop`,
`bookkeeping`), DDP (`ddp`), checkpoints, metrics and faults; evaluation
(`eval/`); the command line (`cli/`)."""
