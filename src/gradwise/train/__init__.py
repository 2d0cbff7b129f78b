"""The one training loop, its step, checkpoint keeping, stopping and the distributed plumbing."""
