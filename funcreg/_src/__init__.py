"""funcreg's implementation, a house with wings: one sub-package per concern, listed bottom to top
in docs/architecture.md (a wing imports only from itself and the wings below it)."""
