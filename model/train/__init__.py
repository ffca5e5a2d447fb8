"""Training, data and evaluation of the small model trained here (the bundled checkpoint)."""
