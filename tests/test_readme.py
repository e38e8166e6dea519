"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README quick start", "exec"), namespace)
    assert (tmp_path / "patching.png").exists() and (tmp_path / "patching.csv").exists()
    assert namespace["logits"].shape[:2] == namespace["p"].clean.shape
    top = namespace["result"].top(2)
    assert {(int(r.layer), int(r.head)) for r in top.itertuples()} == {(0, 0), (1, 3)}
