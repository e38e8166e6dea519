"""Experiments: ready-made scans of a shipped model on a task (they sit at the level of
:mod:`headint.demo` and the CLI, above the scans).

``headint.experiments.minilm``
    each head's effect on the paraphrase margin of all-MiniLM-L6-v2.
"""
