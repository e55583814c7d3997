"""captioner.scoring.ptb: the Java PTBTokenizer run exactly as pycocoevalcap runs it, and its pure-Python twin.

The Java tokenizer starts once for the whole module (`java_out`); the other tests start no JVM or one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from captioner.scoring import ptb
from captioner.scoring.ptb import java_ptb_tokenize, ptb_tokenize, python_ptb_tokenize

FIXTURE = Path(__file__).parent / "fixtures" / "ptb_captions.txt"
# one caption a line, kept as written: trailing spaces and tabs are part of the test
CAPTIONS = FIXTURE.read_text(encoding="utf-8").split("\n")[:-1]

# Hand-checked outputs (read off the Java tokenizer and pycocoevalcap, and explained in captioner.scoring.ptb's docstring).
HAND = {
    "A man's T-shirt (red).": "a man 's t-shirt -lrb- red -rrb-",  # brackets survive, lowercased
    "I can't, won't, don't; it's they're I'm we'll she'd.":
        "i ca n't wo n't do n't it 's they 're i 'm we 'll she 'd",
    "\u201cCurly\u201d and \"straight\" quotes, \u2018single\u2019 ones and the dogs' bowls":
        "curly and straight quotes single ones and the dogs bowls",
    "Mr. Smith, St. Louis, the U.S. etc.": "mr. smith st. louis the u.s. etc.",
    "3 dogs, 3.5 kg, 1,000 people at 10:30, 2nd place, 50% off, $5":
        "3 dogs 3.5 kg 1,000 people at 10:30 2nd place 50 % off $ 5",
    "A black-and-white photo: a - b, a -- b, a\u2014b c": "a black-and-white photo a b a b a b c",
    "Wait... really\u2026 yes!!! what?!": "wait really yes !!! what ?!",
    "Caf\u00e9 na\u00efve \u00a35 \u20ac5 \u00bd cup": "caf\u00e9 na\u00efve # 5 $ 5 1/2 cup",
    "It cannot be, we're gonna win": "it can not be we 're gon na win",
    "and/or #1 @home AT&T Tom & Jerry [sic] {x}": "and/or # 1 @home at&t tom & jerry -lsb- sic -rsb- -lcb- x -rcb-",
    "a\u00a0dog\tand  a cat   ": "a dog and a cat",
    "a dog :) in the grass": "a dog :-rrb- in the grass",
    "emoji \U0001F600 dog": "emoji dog",
    "": "",
    "a dog\non the grass\n": "a dog on the grass",  # a line break inside a caption
    # the lexer reads the list as one text: before a caption starting "A ", a one-letter "A." loses its period
    "A poster with the letter A.": "a poster with the letter a",
    "A dog runs.": "a dog runs",
    "A poster with the letter B.": "a poster with the letter b.",
}
LAST = ("a cat :)", "a cat -rrb-")  # at the very end of the input ":)" is no smiley: ":" and ")" apart
# Every caption goes through the one Java run. The "\r" caption comes first: pycocoevalcap (which only replaces
# "\n") would shift every later line, so its comparison starts after it, where the context is the same.
ALL = ["a\rcarriage return", *CAPTIONS, *HAND, LAST[0]]

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no `java` on PATH: the Java PTBTokenizer cannot run here")


def pycocoevalcap_dir() -> Path:
    return Path(list(importlib.util.find_spec("pycocoevalcap").submodule_search_locations)[0])


@pytest.fixture(scope="module")
def java_out():
    """java_ptb_tokenize(ALL), and the files of pycocoevalcap's tokenizer folder before and after it ran."""
    folder = pycocoevalcap_dir() / "tokenizer"
    before = sorted(os.listdir(folder))
    out = java_ptb_tokenize(ALL)
    return out, before, sorted(os.listdir(folder))


@needs_java
def test_python_twin_equals_java_on_every_fixture_caption(java_out):
    assert len(CAPTIONS) >= 300
    java, _, _ = java_out
    python = python_ptb_tokenize(ALL)
    assert len(python) == len(java) == len(ALL)
    diffs = [(c, j, p) for c, j, p in zip(ALL, java, python) if j != p]
    assert not diffs, f"the Python twin differs from Java's PTBTokenizer on {len(diffs)} captions, first ones:\n" + \
        "\n".join(f"  {c!r}\n    java:   {j!r}\n    python: {p!r}" for c, j, p in diffs[:10])


@needs_java
def test_java_path_gives_what_pycocoevalcap_gives_and_leaves_its_folder_alone(java_out):
    java, before, after = java_out
    assert after == before, "java_ptb_tokenize created files in pycocoevalcap's tokenizer folder"
    if not os.access(pycocoevalcap_dir() / "tokenizer", os.W_OK):
        pytest.skip("pycocoevalcap's tokenizer folder is read-only: its own PTBTokenizer cannot run here")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = ALL[1:]
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(texts)})
    assert [theirs[i][0] for i in range(len(texts))] == java[1:]


@pytest.mark.parametrize("backend", [pytest.param("java", marks=needs_java), "python"])
def test_hand_checked_outputs(backend, request):
    out = request.getfixturevalue("java_out")[0] if backend == "java" else python_ptb_tokenize(ALL)
    hand = out[1 + len(CAPTIONS):-1]
    assert dict(zip(HAND, hand)) == HAND
    assert out[-1] == LAST[1]
    assert out[0] == "a carriage return"  # "\r" ends a line for the lexer: replaced like "\n"


def test_python_backend_never_starts_java_and_auto_follows_java(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, no_process)
    assert ptb_tokenize(["A man's T-shirt (red)."], backend="python") == ["a man 's t-shirt -lrb- red -rrb-"]
    assert ptb_tokenize([]) == [] and python_ptb_tokenize([]) == [] and java_ptb_tokenize([]) == []

    seen = []
    monkeypatch.setattr(ptb, "java_ptb_tokenize", lambda texts: seen.append(list(texts)) or ["<java>"] * len(texts))
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: "/usr/bin/java" if cmd == "java" else None)
    assert ptb_tokenize(["A dog."]) == ["<java>"] and seen == [["A dog."]]
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None)
    assert ptb_tokenize(["A dog."]) == ["a dog"] and len(seen) == 1
    with pytest.raises(ValueError, match="backend"):
        ptb_tokenize(["A dog."], backend="perl")
    with pytest.raises(TypeError, match="single string"):
        ptb_tokenize("A dog.")


def test_java_failures_are_clear_errors(monkeypatch):
    failed = subprocess.CompletedProcess([], 1, b"", b"Error: Could not find or load main class")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match=r"java .*stanford-corenlp-3\.4\.1\.jar.*status 1.*main class"):
        java_ptb_tokenize(["a dog"])

    def no_java(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", "java")

    monkeypatch.setattr(subprocess, "run", no_java)
    with pytest.raises(RuntimeError, match=r"could not start java.*stanford-corenlp-3\.4\.1\.jar"):
        java_ptb_tokenize(["a dog"])
