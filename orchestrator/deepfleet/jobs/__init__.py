"""A job from start to end: inputs checked, launched on every machine, watched, logged."""
