from captioner.data.vocabulary import EOS, PAD, SOS, UNK, Vocabulary, encode_captions, normalize, tokenize


def test_tokenize_lowercases_splits_punctuation_and_tolerates_unicode():
    assert tokenize("A dog, running.") == ["a", "dog", ",", "running", "."]
    assert tokenize("  Two   men\tplay\n ") == ["two", "men", "play"]
    assert tokenize("The man's café — ＢＩＧ!") == ["the", "man's", "café", "—", "big", "!"]
    assert tokenize("") == [] and tokenize(None) == []
    assert normalize("A  Dog.") == "a dog ."


def test_vocabulary_min_count_specials_and_roundtrip(tmp_path):
    caps = ["a red circle"] * 5 + ["a blue square"] * 4 + ["a green star"]
    v = Vocabulary.build(caps, min_count=5)
    assert v.itos[:4] == [PAD, SOS, EOS, UNK]
    assert set(v.itos[4:]) == {"a", "red", "circle"}  # "a" seen 10x, blue/square 4x < 5
    ids = v.encode("A red square")
    assert ids[0] == v.sos_id and ids[-1] == v.eos_id and v.unk_id in ids
    assert v.decode(ids) == "a red <unk>"
    assert v.decode([v.sos_id, v.stoi["red"], v.pad_id, v.eos_id, v.stoi["a"]]) == "red"
    v.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == v
    assert Vocabulary.build(caps, min_count=1).stoi.keys() >= {"blue", "square", "green", "star"}


def test_truncation_is_counted():
    v = Vocabulary.build(["w " * 40, "short one"], min_count=1)
    ids, truncated = encode_captions(v, ["w " * 40, "short one"], max_length=30)
    assert truncated == 1
    assert len(ids[0]) == 32 and len(ids[1]) == 4
