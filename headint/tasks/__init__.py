"""Task data: the synthetic tasks the shipped models are trained and probed on, and the training
script of ``induction-2l``.

``headint.tasks.induction``
    The in-context copying task of ``induction-2l`` (training batches, repeated random tokens for
    attention-pattern scores, clean / corrupted prompt pairs for causal scans, copy accuracy).
``headint.tasks.train_induction``
    ``python -m headint.tasks.train_induction``: trains ``induction-2l`` (deterministic).
``headint.tasks.paraphrase``
    Sentence / paraphrase / unrelated-sentence triples, sentence embeddings and the paraphrase
    margin metric used with all-MiniLM-L6-v2.

Tasks know models, metrics and data; they never run scans (``headint.experiments`` and
``headint.demo`` do).
"""
