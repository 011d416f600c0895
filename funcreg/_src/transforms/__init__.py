"""The building blocks: one factory per gradient transformation (``scale``, ``trace``, the Adam
family, adaptive and sign methods, factored and orthogonalized updates)."""
