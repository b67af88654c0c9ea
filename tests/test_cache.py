"""vramplan/cache.py: one cache root for every kind, entries written whole or not at all."""

from vramplan.cache import cache_root, write_atomic


def test_the_root_follows_vramplan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("VRAMPLAN_CACHE", "")          # empty: the default, not the working folder
    assert cache_root().name == "vramplan" and cache_root().parent.name == ".cache"


def test_an_entry_is_written_whole_and_replaced_whole(tmp_path):
    entry = tmp_path / "kind" / "entry.bin"
    assert write_atomic(entry, b"x" * 100_000)
    assert entry.read_bytes() == b"x" * 100_000
    assert write_atomic(entry, b"second")
    assert entry.read_bytes() == b"second"
    assert [p.name for p in entry.parent.iterdir()] == ["entry.bin"]      # no temporary file left


def test_an_unwritable_cache_writes_nothing_and_says_so(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    assert not write_atomic(blocker / "kind" / "entry.bin", b"data")
    assert blocker.read_text() == "kept"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert not write_atomic(folder, b"data")       # a folder where the entry would go: left alone
    assert folder.is_dir() and not list(folder.iterdir())
