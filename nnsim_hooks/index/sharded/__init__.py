"""Several processes: torchrun and ``shard=(i, n)`` builds, shard folders and merging, sharded queries."""
