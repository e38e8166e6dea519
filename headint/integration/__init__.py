"""Integration with Hugging Face ``transformers``.

- :mod:`.hf`: :func:`intervene` (validate, then open a session);
- :mod:`.session`: per-thread session stacks and the reference-counted config switch;
- :mod:`.attention_function`: the attention function registered as ``"headint"``;
- :mod:`.adapter`: every guess about a model's structure (configs, blocks, position ids);
- :mod:`.structure`: the probe forward: attention sites, per-layer shapes, refusals;
- :mod:`.blocks`: capturing and replaying block outputs (scans);
- :mod:`.record`: :func:`record` and :class:`Recorder`.
"""
