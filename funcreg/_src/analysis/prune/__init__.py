"""Exact structured pruning after group lasso: the chain of layers, the rule per pair, the report."""
