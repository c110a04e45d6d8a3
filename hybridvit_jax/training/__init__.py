"""Training: state, optimizer, pure steps, metrics, checkpoints and the loop."""
