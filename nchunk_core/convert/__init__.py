"""Offline: a Hugging Face checkpoint into a store, calibrated and reordered hot-to-cold."""
