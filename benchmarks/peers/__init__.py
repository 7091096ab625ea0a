"""One adapter per peer package, each doing the work of ``nnsim_hooks.features`` (see
``base.py``); ``bench_peers.py`` runs each in its own process."""

# Fast peers first, the slowest last: a run cut short keeps the most rows.
PEERS = ["nnsim", "logix", "captum", "bergson", "opacus", "traker", "dattri"]
