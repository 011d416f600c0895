"""Training steps over parameter trees: ``make_step``, ensemble members and vmapped ensembles,
metric history, checkpoints and flat metrics."""
