"""Benchmarks run on the GPU machine; each prints one JSON result line and writes it under --out."""
