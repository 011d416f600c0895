"""Looking at models and optimizers: sparsity and norms, hypergradients, regularization paths,
classifying an optimizer's decay (probe), structured pruning."""
