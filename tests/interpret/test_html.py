"""The report page (interpret/html.py): complete, escaped, and checked for missing files."""
import pytest

from heron.interpret.html import Section, Table, missing_files, write_html
from heron.interpret.plots import token_label

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def test_a_page_references_only_files_beside_it(tmp_path):
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "lens.png").write_bytes(PNG)
    sections = [Section("Logit lens", "What it shows.\n\nHow to read it.", images=["figs/lens.png"],
                        tables=[Table(["layer", "p"], [[0, 0.25], [1, "<eos>"]], caption="top token")])]
    page = write_html(tmp_path / "index.html", "Report <of> x", sections, facts=[("model", "runs/demo")])
    text = page.read_text()
    assert missing_files(page) == []
    assert "Report &lt;of&gt; x" in text and "<of>" not in text and "&lt;eos&gt;" in text
    assert text.count('<p class="about">') == 2 and '<img src="figs/lens.png"' in text
    assert '<a href="#s0">Logit lens</a>' in text and "<td>0.25</td>" in text and "http" not in text
    (tmp_path / "figs" / "lens.png").unlink()
    assert missing_files(page) == ["figs/lens.png"]


def test_a_missing_image_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"^images: gone.png \(section 'A'\)"):
        write_html(tmp_path / "index.html", "t", [Section("A", "about", images=["gone.png"])])
    assert list(tmp_path.iterdir()) == []


def test_token_labels_show_whitespace_and_escape_what_fonts_cannot_draw():
    assert token_label("a b\n\t\x1a") == "a·b⏎⇥\\x1a"
    assert token_label("") == "∅"
