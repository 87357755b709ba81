"""The report page (interpret/html.py): complete, escaped, and checked for missing files."""
import re

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


def test_an_image_outside_the_report_folder_is_refused_and_counts_as_missing(tmp_path):
    """"../x.png" was written into the page and missing_files called the page complete,
    though zipping the folder would leave the image behind."""
    folder = tmp_path / "report"
    (folder / "figs").mkdir(parents=True)
    (tmp_path / "x.png").write_bytes(PNG)
    (folder / "figs" / "y.png").write_bytes(PNG)
    for image in ["../x.png", "figs/../../x.png", str(tmp_path / "x.png")]:
        with pytest.raises(ValueError, match=rf"^images: {re.escape(image)} \(section 'A'\) is outside the "
                                             rf"report folder {re.escape(str(folder))};"):
            write_html(folder / "index.html", "t", [Section("A", "about", images=[image])])
    assert not (folder / "index.html").exists()
    inside = write_html(folder / "index.html", "t", [Section("A", "a", images=["figs/../figs/y.png"])])
    assert missing_files(inside) == []
    (folder / "hand.html").write_text(f'<img src="../x.png"><img src="{tmp_path / "x.png"}"><a href="#s0">')
    assert missing_files(folder / "hand.html") == ["../x.png", str(tmp_path / "x.png")]



    assert token_label("a b\n\t\x1a") == "a·b⏎⇥\\x1a"
    assert token_label("") == "∅"
