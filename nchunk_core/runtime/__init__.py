"""The flash runtime: row selection, streamed projections, the VLM with flash layers, the session."""
