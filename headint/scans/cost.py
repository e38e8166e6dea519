"""What a scan's engine ran, counted in layer-forwards (one transformer block applied to one
row) and token-layer-forwards (one block over one token of one row)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Cost:
    """Work done, counted per transformer block applied to one row (and to one token)."""

    runs: int = 0
    rows: int = 0
    layer_forwards: int = 0
    token_layer_forwards: int = 0
    last_query_rows: int = 0  # rows whose final block ran for the last query only (two calls: see LastQueryBlock)
    clean_attention_rows: int = 0  # rows whose first intervened layer took the clean run's attention
    replayed_projection_rows: int = 0  # ... and its attention module's work before attention (q/k/v projections)
    captures: int = 0  # forwards stopped at an attention call to capture that work (see VariantRunner.children_before_attention)

    def add(self, rows: int, layers: int, tokens: int) -> None:
        self.runs += 1
        self.rows += rows
        self.layer_forwards += rows * layers
        self.token_layer_forwards += rows * layers * tokens

    def add_final_second_call(self, rows: int, tokens: int, last_query: bool) -> None:
        """The final block's second call (see ``LastQueryBlock``), over ``tokens`` tokens of
        ``rows`` rows: the last one (``last_query``), or all of them where a sliding window
        dropped keys. Its first call, over every fed token and stopped after the keys/values,
        is counted by :meth:`add`."""
        self.last_query_rows += rows if last_query else 0
        self.layer_forwards += rows
        self.token_layer_forwards += rows * tokens

    def add_capture(self, rows: int, tokens: int) -> None:
        """A forward stopped at one layer's attention call, counted as one layer-forward of
        ``rows`` rows; not a run."""
        self.captures += 1
        self.layer_forwards += rows
        self.token_layer_forwards += rows * tokens

    def as_dict(self) -> dict:
        return asdict(self)
