"""The offload engine: expert records in tiers, the swapper, the sparse expert optimizer, NVMe I/O."""
