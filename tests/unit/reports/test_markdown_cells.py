"""summary.md's table cells show file names and labels as they are: a name can neither end its
cell nor turn into a link, a picture, HTML or emphasis when a viewer renders the page."""

from __future__ import annotations

import re

import pytest
from markdown_it import MarkdownIt

from imgpipe.reports.data_quality import _cell, _code

NAMES = ["daisy/a|b.jpg", "rose/[click](http://x.invalid).png", "tulip/<img src=x onerror=alert(1)>.jpg",
         "sun/*bold* and `code`.png", "back\\slash/x.png", "plain/img_001.jpg"]


def rendered_cells(markdown: str) -> list[str]:
    html = MarkdownIt("commonmark").enable("table").render(markdown)
    return re.findall(r"<td>(.*?)</td>", html, re.S)


@pytest.mark.parametrize("name", NAMES)
def test_a_file_name_is_one_cell_of_plain_text(name):
    cells = rendered_cells(f"| file | reason |\n|---|---|\n| {_cell(name)} | too small |\n")
    escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    assert cells == [escaped, "too small"]


def test_a_code_span_keeps_its_cell_and_shows_the_label():
    cells = rendered_cells(f"| class |\n|---|\n| {_code('Rose|red')} |\n")
    assert cells == ["<code>Rose|red</code>"]
