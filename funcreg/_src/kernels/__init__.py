"""torch's own optimizer kernels behind donated steps, penalty forms folded into them, the buffers
they keep, and the one functional entry that dispatches a donated step (``update.py``)."""
