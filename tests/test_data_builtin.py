"""The built-in story corpus: deterministic, varied, well formed, and cached once prepared."""

import re
from collections import Counter

import pytest

from nanomoe.data import builtin_corpus_dir, generate_stories, read_meta
from nanomoe.data.builtin_corpus import PLOTS, story


@pytest.fixture(scope="module")
def stories():
    return list(generate_stories(seed=0, count=1500))


def test_stories_are_deterministic_by_seed_and_split():
    first = list(generate_stories(seed=7, count=20))
    assert first == list(generate_stories(seed=7, count=20))
    assert first[5] == story(7, 5)  # story i does not depend on the ones before it
    other_seed = list(generate_stories(seed=8, count=20))
    val = list(generate_stories(seed=7, count=20, split="val"))
    assert not set(first) & set(other_seed) and not set(first) & set(val)


def test_size_in_bytes_is_respected():
    out = list(generate_stories(seed=0, size_bytes=50_000))
    total = sum(len(s.encode()) for s in out)
    assert 50_000 <= total < 50_000 + max(len(s.encode()) for s in out)


def test_stories_are_well_formed(stories):
    for s in stories:
        assert "{" not in s and "}" not in s, s  # no unfilled template field
        assert s[0].isupper() and s[-1] in '.!?"', s
        assert "  " not in s and s == s.strip()
        assert s.count('"') % 2 == 0, s  # quotes are balanced
    assert sum('"' in s for s in stories) > 0.9 * len(stories)  # dialogue in nearly every story


def test_stories_are_varied_enough_that_memorizing_does_not_work(stories):
    assert len(set(stories)) == len(stories)
    openings = Counter(s.split(".")[0] for s in stories)
    assert len(openings) > 0.5 * len(stories)
    names = Counter(re.findall(r"named (\w+)", " ".join(stories)))
    assert len(names) >= 60
    words = set(re.findall(r"[a-z]+", " ".join(stories).lower()))
    assert len(words) > 1000
    morals = {m for s in stories for m in re.findall(r"The moral of the story is: ([^.]+)", s)}
    assert len(morals) >= 30
    # every plot shows up (each one has a line no other plot has)
    markers = ["gone!", "share", "Hello", "scared", "help", "broke", "build", "race", "seed", "try again",
               "surprise", "explor", "rain", "tummy"]
    assert len(PLOTS) == len(markers)
    for marker in markers:
        assert sum(marker.lower() in s.lower() for s in stories) > 20, marker


def test_builtin_corpus_dir_is_prepared_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOMOE_CACHE", str(tmp_path / "cache"))
    path = builtin_corpus_dir(size_mb=0.15, vocab_size=300)
    assert path.parent == tmp_path / "cache"
    meta = read_meta(path)
    assert meta["vocab_size"] <= 300 and meta["splits"]["train"]["bytes"] >= 150_000
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert builtin_corpus_dir(size_mb=0.15, vocab_size=300) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps  # nothing rewritten
    assert builtin_corpus_dir(tmp_path / "elsewhere", size_mb=0.15, vocab_size=300).parent == tmp_path / "elsewhere"
