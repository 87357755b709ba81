import os
import shutil

import pytest

from heron.data import Corpus, default_corpus


def make_tree(root) -> None:
    files = {
        "b.py": "print('b')\n",
        "a.py": "print('a')\n",
        "notes.txt": "not python\n",
        "pkg/z.py": "z = 1\n",
        "pkg/sub/y.py": "y = 2\n",
        ".hidden/x.py": "hidden = True\n",
        "pkg/.secret.py": "secret = True\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_folder_walk_is_recursive_sorted_and_filtered(tmp_path) -> None:
    make_tree(tmp_path)
    corpus = Corpus([tmp_path], extensions=[".py"])
    assert corpus.keys == ["a.py", "b.py", "pkg/sub/y.py", "pkg/z.py"]
    assert list(corpus) == ["print('a')\n", "print('b')\n", "y = 2\n", "z = 1\n"]
    assert corpus.paths[0] == tmp_path / "a.py"
    assert len(Corpus([tmp_path])) == 5  # no filter: notes.txt too, hidden entries still skipped


def test_globs_and_files(tmp_path, monkeypatch) -> None:
    make_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert Corpus(["*.py"]).keys == ["a.py", "b.py"]
    assert Corpus(["pkg/*/*.py"]).keys == ["sub/y.py"]
    by_glob = Corpus([str(tmp_path / "pkg" / "**" / "*.py")])
    assert by_glob.keys == ["sub/y.py", "z.py"]  # relative to the glob's fixed folder
    by_file = Corpus([tmp_path / "notes.txt"], extensions=[".py"])  # named files bypass the filter
    assert by_file.keys == ["notes.txt"]
    both = Corpus([tmp_path / "a.py", tmp_path], extensions=["py"])
    assert len(both) == 4  # a.py named twice counts once


def test_missing_sources_name_the_path(tmp_path) -> None:
    make_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        Corpus([tmp_path / "nothing-here"])
    with pytest.raises(FileNotFoundError, match=r"matched no files with extensions \['\.rs'\]"):
        Corpus([tmp_path], extensions=[".rs"])
    with pytest.raises(FileNotFoundError, match=r"\*\.zig"):
        Corpus([str(tmp_path / "*.zig")])


def test_undecodable_files_are_skipped_and_counted(tmp_path) -> None:
    make_tree(tmp_path)
    (tmp_path / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    corpus = Corpus([tmp_path], extensions=[".py"])
    assert len(corpus) == 5
    docs = dict(corpus.items())
    assert "latin1.py" not in docs and len(docs) == 4
    assert corpus.skipped == [tmp_path / "latin1.py"]


def test_fingerprint_follows_content_not_location(tmp_path) -> None:
    make_tree(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    one, two = Corpus([tmp_path / "one"]), Corpus([tmp_path / "two"])
    assert one.fingerprint() == two.fingerprint() == one.fingerprint()
    (tmp_path / "two" / "a.py").write_text("print('A')\n")  # same size, other bytes
    assert Corpus([tmp_path / "two"]).fingerprint() != one.fingerprint()
    (tmp_path / "two" / "a.py").write_text("print('a')\n")
    os.utime(tmp_path / "two" / "a.py", (0, 0))  # a touched file with equal bytes hashes the same
    assert Corpus([tmp_path / "two"]).fingerprint() == one.fingerprint()


def test_default_corpus_is_the_stdlib_without_packages_or_tests() -> None:
    corpus = default_corpus()
    keys = set(corpus.keys)
    assert {"os.py", "json/__init__.py"} <= keys
    assert not any(k.startswith(("site-packages/", "test/")) or "/__pycache__/" in k for k in keys)
    assert all(k.endswith(".py") for k in keys)
    assert len(default_corpus(include_tests=True)) > len(corpus)
