"""The four forms of applying a penalty (loss term, coupled edit, decoupled update, proximal step),
and accelerated and preconditioned proximal methods."""
