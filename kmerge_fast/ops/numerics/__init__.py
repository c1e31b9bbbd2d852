"""Torch numerics the backends share (no backend choice here).

- ``elementwise``: the trim / elect / drop rules of TIES, DARE and magnitude pruning;
- ``scaling``: power-of-two range normalisation of factors around an op;
- ``gram_svd``: the R x R algebra of ``truncate`` from the Grams of the stacks;
- ``top_svd``: the leading rank-r SVD of one dense matrix (the dense-domain merges).
"""
