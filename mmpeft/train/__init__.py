"""Training: the shared loop and its batch sampler."""
