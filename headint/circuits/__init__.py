"""Edge-level circuits (see :mod:`headint.circuits.graph` for the graph and its names)."""
