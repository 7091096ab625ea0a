"""The on-disk index folder: format, manifest, lock, columns, integrity, writing and loading."""
