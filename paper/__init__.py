"""Reproductions of the experiments of Charpiat et al. (NeurIPS 2019), one command each.

Each script takes ``--small`` (the version CI runs in seconds) and ``--out DIR`` and writes a
markdown table and a PNG figure there (default ``paper/results/``). See docs/paper.md
(the paper and its reproductions).
"""
