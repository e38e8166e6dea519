"""Checks on a report.html shared by the tests: its JSON data block and its self-containment."""

from __future__ import annotations

import base64
import hashlib
import json
import re

SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name, not a resource: the viewer creates SVG elements in it


def report_data(html: str) -> dict:
    """The report's data (its one ``<script type="application/json" class="hi-data">`` block)."""
    blocks = re.findall(r'<script type="application/json" class="hi-data" id="[\w-]+">(.*?)</script>', html, re.S)
    assert len(blocks) == 1, f"expected one data block, found {len(blocks)}"
    return json.loads(blocks[0])


def scripts(html: str) -> list[tuple[str, str]]:
    """``(attributes, text)`` of every ``<script>`` element."""
    return re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S | re.I)


def assert_self_contained(html: str, standalone: bool = True) -> None:
    """No resource outside the file; two scripts (the data block and the viewer); in a
    standalone file, a Content Security Policy that allows exactly that viewer script."""
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", html), "a resource outside the file"
    assert not re.search(r"https?://", html.replace(SVG_NAMESPACE, "")), "a URL in the file"
    assert not re.search(r"@import|url\(\s*['\"]?(?!data:)", html), "a style sheet resource outside the file"
    found = scripts(html)
    assert len(found) == 2 and html.lower().count("<script") == 2, [a for a, _ in found]
    assert found[0][0].strip().startswith('type="application/json"') and found[1][0] == ""
    if standalone:
        digest = base64.b64encode(hashlib.sha256(found[1][1].encode()).digest()).decode()
        csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', html)
        assert csp, "no Content Security Policy"
        assert f"script-src 'sha256-{digest}';" in csp.group(1) and "default-src 'none'" in csp.group(1)
        assert html.index("Content-Security-Policy") < html.index("<body>")
    data_text = found[0][1]
    low = data_text.lower()
    assert "</script" not in low and "<!--" not in low and "<" not in data_text and ">" not in data_text
