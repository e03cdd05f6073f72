"""How fast the drive serves bytes: the direct-I/O reader, the drive's identity, its latency profile."""
