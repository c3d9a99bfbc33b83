"""Benchmark suite of binwslt: speed, saved-for-backward bytes and modelled memory traffic (see README.md here)."""
