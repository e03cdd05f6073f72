"""Programs around the node: the demo, the soak run, the synthetic camera."""
