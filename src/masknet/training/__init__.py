"""Training: loss, metrics, the loop, run folders."""
