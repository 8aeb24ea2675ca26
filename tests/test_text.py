from captioning.text import PAD, SPECIALS, Vocabulary, has_words, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red circle, left of 2 boxes.") == ["a", "red", "circle", "left", "of", "2", "boxes"]
    assert tokenize("The dog's ball!") == ["the", "dog", "'s", "ball"]  # split as the seed's word_tokenize does


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


# COCO-style captions with what the seed's tokenizer must handle: accents, hyphenated words,
# quotes, possessives, contractions, dashes and a sentence end inside the caption.
COCO_STYLE = {
    "A man in a t-shirt is eating a hot-dog.": ["a", "man", "in", "a", "t-shirt", "is", "eating", "a", "hot-dog"],
    "A black-and-white photo of a two-story house": ["a", "black-and-white", "photo", "of", "a", "two-story", "house"],
    "People sitting outside of a café in Paris.": ["people", "sitting", "outside", "of", "a", "café", "in", "paris"],
    "A jalapeño pizza on a plate next to a crème brûlée": ["a", "jalapeño", "pizza", "on", "a", "plate", "next", "to",
                                                          "a", "crème", "brûlée"],
    "The dog's frisbee is in the man's hand": ["the", "dog", "'s", "frisbee", "is", "in", "the", "man", "'s", "hand"],
    "A sign that says \"Don't Walk\" -- near a street.": ["a", "sign", "that", "says", "do", "n't", "walk", "near", "a",
                                                          "street"],
    "A 2-year-old boy plays with a ball. His mom watches.": ["a", "2-year-old", "boy", "plays", "with", "a", "ball",
                                                             "his", "mom", "watches"],
    "A bus - parked on the side of the road , by a U.S. flag": ["a", "bus", "parked", "on", "the", "side", "of",
                                                                "the", "road", "by", "a", "u.s.", "flag"],
    "  ...  ": [],
}


def test_tokenize_is_the_seeds_treebank_tokenizer_on_coco_style_captions():
    for caption, tokens in COCO_STYLE.items():
        assert tokenize(caption) == tokens, caption
        assert has_words(caption) == bool(tokens), caption


def test_tokenize_needs_no_downloaded_nltk_data(tmp_path, monkeypatch):
    import subprocess
    import sys

    # An empty NLTK_DATA: word_tokenize's punkt would fail here; ours must not need it.
    code = "from captioning.text import tokenize; print(tokenize('A café. Le t-shirt!'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"NLTK_DATA": str(tmp_path), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "['a', 'café', 'le', 't-shirt']"
