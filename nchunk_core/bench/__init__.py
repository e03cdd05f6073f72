"""Benchmarks: programs that print tables, write PNG plots and, with --json, one JSON object."""
