"""vramplan/estimate/graph.py's compiled-trace cache: a trace read back from the cache is the one
parsed from its file, a bad or missing entry is made again, and no cache at all still works."""

import gzip
import json

import pytest

from vramplan.estimate import graph as graph_module
from vramplan.estimate.graph import compiled_graph, parse_graph, trace_path

ENV = {"B": 2, "H": 64, "W": 96, "R": 8}


@pytest.fixture
def trace(tmp_path):
    """A copy of a shipped SD 1.5 denoiser trace, so that tests may change it."""
    source = trace_path("sd15", "unet.amp-frozen.sdpa")
    path = tmp_path / source.name
    path.write_bytes(source.read_bytes())
    return path


def _expected(path):
    return parse_graph(json.loads(gzip.decompress(path.read_bytes())))


def _entries(cache):
    return sorted((cache / "compiled-traces").glob("*.marshal"))


def test_a_trace_is_read_back_from_the_cache_as_it_was_parsed(trace, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VRAMPLAN_CACHE", str(cache))
    expected = _expected(trace)
    first = compiled_graph(trace)
    assert len(_entries(cache)) == 1
    monkeypatch.setattr(graph_module, "parse_graph", lambda *a: pytest.fail("parsed again"))
    again = compiled_graph(trace)
    assert again.data == first.data == expected.data
    assert again.evaluate(ENV) == expected.evaluate(ENV)
    assert len(expected.evaluate(ENV)) > 100 and len(expected.data["ops"]) > 1000


def test_a_changed_trace_is_not_read_from_the_old_entry(trace, tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    compiled_graph(trace)
    data = json.loads(gzip.decompress(trace.read_bytes()))
    data["exprs"][0] = "B*1234567"
    trace.write_bytes(gzip.compress(json.dumps(data).encode()))
    assert compiled_graph(trace).evaluate(ENV)[0] == 2 * 1234567
    assert len(_entries(tmp_path / "cache")) == 2


def test_a_damaged_entry_is_made_again(trace, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VRAMPLAN_CACHE", str(cache))
    compiled_graph(trace)
    entry, = _entries(cache)
    entry.write_bytes(entry.read_bytes()[:1000])
    assert compiled_graph(trace).evaluate(ENV) == _expected(trace).evaluate(ENV)
    entry.write_bytes(b"not marshal")
    assert compiled_graph(trace).evaluate(ENV) == _expected(trace).evaluate(ENV)
    assert len(entry.read_bytes()) > 1000        # written again, whole


def test_without_a_writable_cache_the_trace_is_parsed(trace, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VRAMPLAN_CACHE", str(blocker))      # a file: no folder can be made under it
    assert compiled_graph(trace).evaluate(ENV) == _expected(trace).evaluate(ENV)


def test_a_formula_the_check_refuses_is_refused_from_the_file(trace, tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    data = json.loads(gzip.decompress(trace.read_bytes()))
    data["exprs"][0] = "__import__('os').getcwd()"
    trace.write_bytes(gzip.compress(json.dumps(data).encode()))
    with pytest.raises(ValueError):
        compiled_graph(trace)
    assert not _entries(tmp_path / "cache")
