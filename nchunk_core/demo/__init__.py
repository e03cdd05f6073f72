"""The built-in model: scenes of coloured shapes, the small SmolVLM, its training and its shipped store."""
