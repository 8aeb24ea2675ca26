from captioning.text import PAD, SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red circle, left of 2 boxes.") == ["a", "red", "circle", "left", "of", "2", "boxes"]
    assert tokenize("The dog's ball!") == ["the", "dog's", "ball"]


def test_build_keeps_words_at_threshold_and_specials_first():
    vocab = Vocabulary.build(["a red circle", "a blue circle", "a red star"], threshold=2)
    assert vocab.words[:4] == list(SPECIALS)
    assert vocab.index[PAD] == 0
    assert set(vocab.words[4:]) == {"a", "red", "circle"}
    assert vocab.words[4] == "a"  # most frequent first


def test_encode_decode_round_trip_and_unknown_words():
    vocab = Vocabulary.build(["a red circle"], threshold=1)
    ids = vocab.encode("A red triangle")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids[3] == vocab.unk_id
    assert vocab.decode(ids) == "a red <unk>"
    assert vocab.decode([vocab.start_id, vocab.index["red"], vocab.end_id, vocab.index["a"]]) == "red"


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["two blue squares", "a star"], threshold=1)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path) == vocab
    assert path.read_text().startswith("{")
