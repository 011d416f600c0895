"""Regularization paths: one vmapped run per coefficient, cross-validation folds, the result."""
