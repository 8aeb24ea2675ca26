"""Beam search, for both decoders: beam 1 is greedy, batching changes nothing, scores are the
model's, and it finds what greedy misses."""

import math

import pytest
import torch

from captioning.model import AttentionDecoder, Captioner, CaptionSearch, Decoder
from captioning.params import ModelParams

END = 2
SMALL = ModelParams(backbone="resnet18", image_size=32, embed_size=16, hidden_size=24, max_seq_len=9)
DECODERS = ("lstm", "attention")
CELLS, FEATURE = 4, 10  # the attention decoder's grid: 4 cells of 10 values


def random_decoder(seed: int, kind: str = "lstm", vocab_size: int = 13) -> CaptionSearch:
    """Random weights, sharpened and with <end> favoured so that captions end at all sorts of
    lengths (PyTorch's initial output layer gives near-uniform, state-blind word choices)."""
    torch.manual_seed(seed)
    if kind == "lstm":
        decoder = Decoder(SMALL.embed_size, SMALL.hidden_size, vocab_size, 1, SMALL.max_seq_len)
    else:
        decoder = AttentionDecoder(FEATURE, SMALL.embed_size, SMALL.hidden_size, 8, vocab_size, SMALL.max_seq_len)
    decoder.eval()
    with torch.no_grad():
        decoder.linear.weight *= 6
        decoder.linear.bias[END] += 0.5
        if kind == "attention":
            decoder.score.weight *= 4  # peaked attention, so the cells' order matters
    return decoder


def random_features(kind: str, n: int) -> torch.Tensor:
    """What each decoder decodes from: (n, E) image vectors, or (n, P, F) grids."""
    return torch.randn(n, SMALL.embed_size) * 2 if kind == "lstm" else torch.randn(n, CELLS, FEATURE) * 2


def until_end(ids: list[int]) -> list[int]:
    """Ids up to the first <end> after the <start> step, as Vocabulary.decode reads them."""
    for i, token in enumerate(ids):
        if token == END and i > 0:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def log_prob(decoder: CaptionSearch, features: torch.Tensor, ids: list[int]) -> float:
    """Teacher-forced summed log-prob of `ids` (from <start> on) given one image's features."""
    logits, _ = decoder(features.unsqueeze(0), torch.tensor([ids]), torch.tensor([len(ids)]))  # (len, V)
    return float(logits.log_softmax(1)[torch.arange(len(ids)), torch.tensor(ids)].sum())


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("length_penalty", [0.0, 0.7, 1.0])
def test_beam_size_1_is_greedy(length_penalty, kind):
    decoder = random_decoder(3, kind)
    features = random_features(kind, 300)
    greedy = decoder.greedy(features, END).tolist()
    beam, _ = decoder.beam_search(features, END, 1, length_penalty)
    assert [until_end(r) for r in beam.tolist()] == [until_end(r) for r in greedy]
    lengths = {len(until_end(r)) for r in greedy}
    assert len(lengths) > 3  # the case is not trivial: captions of many lengths, some truncated
    assert SMALL.max_seq_len in lengths


@pytest.mark.parametrize("kind", DECODERS)
def test_generate_with_beam_1_gives_greedy_ids_from_images(kind):
    torch.manual_seed(1)
    model = Captioner.build(ModelParams(**{**SMALL.__dict__, "decoder": kind, "image_size": 64}), vocab_size=13).eval()
    images = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        greedy = model.decoder.greedy(model.encoder(images), END)
    assert torch.equal(model.generate(images, END, beam_size=1, length_penalty=0.0, bf16=False), greedy)
    beam = model.generate(images, END, beam_size=3, length_penalty=0.5, bf16=False)
    assert beam.shape[0] == 6 and 1 <= beam.shape[1] <= SMALL.max_seq_len


def test_bf16_autocast_is_switched_on_for_cuda_alone():
    """compute.bf16 means bf16 autocast on CUDA and nothing elsewhere, so CPU results never depend
    on it (comparing two CPU runs would compare a no-op with itself)."""
    import contextlib
    import warnings

    from captioning import accel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no GPU here: torch warns that it disables the context
        on_cuda = accel.autocast(torch.device("cuda"), True)
    assert isinstance(on_cuda, torch.autocast) and on_cuda.fast_dtype == torch.bfloat16
    for device, enabled in ((torch.device("cpu"), True), (torch.device("cuda"), False)):
        assert isinstance(accel.autocast(device, enabled), contextlib.nullcontext)


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("beam_size, length_penalty", [(3, 0.0), (4, 1.0)])
def test_batching_does_not_change_beam_search(beam_size, length_penalty, kind):
    decoder = random_decoder(3, kind)
    features = random_features(kind, 40)
    ids, scores = decoder.beam_search(features, END, beam_size, length_penalty)
    for i in range(len(features)):
        alone_ids, alone_score = decoder.beam_search(features[i:i + 1], END, beam_size, length_penalty)
        assert until_end(alone_ids[0].tolist()) == until_end(ids[i].tolist()), i
        assert alone_score.item() == pytest.approx(scores[i].item(), abs=1e-5)


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
def test_scores_are_the_models_length_normalised_log_probs(length_penalty, kind):
    decoder = random_decoder(4, kind)
    features = random_features(kind, 30)
    ids, scores = decoder.beam_search(features, END, 3, length_penalty)
    for row, score, feature in zip(ids.tolist(), scores.tolist(), features):
        caption = until_end(row)
        expected = log_prob(decoder, feature, caption) / len(caption) ** length_penalty
        assert score == pytest.approx(expected, abs=1e-4)


class TableDecoder(Decoder):
    """A hand-built decoder whose next-token probabilities depend on the previous token alone.

    Token 0 stands for the image: step 0 reads it back from the one-hot embedding of the image
    `search` passes; later steps read the previous token itself.
    """

    def __init__(self, probs: dict[int, dict[int, float]], vocab_size: int = 6, max_seq_len: int = 6):
        super().__init__(vocab_size, 1, vocab_size, 1, max_seq_len)
        table = torch.full((vocab_size, vocab_size), 1e-6)
        for prev, row in probs.items():
            for token, p in row.items():
                table[prev, token] = p
        self.table = (table / table.sum(1, keepdim=True)).log()  # (V, V) log P(next | prev)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.eye(vocab_size))

    def step(self, state, tokens):
        previous = state[0][:, 0].argmax(1) if tokens is None else tokens  # (N,)
        return self.table[previous], (None, (torch.zeros(1, len(previous), 1),))

    def search(self, beam_size: int, length_penalty: float = 0.0) -> tuple[list[int], float]:
        ids, scores = self.beam_search(torch.eye(self.embedding.num_embeddings)[:1], END, beam_size, length_penalty)
        return until_end(ids[0].tolist()), scores.item()


START, A, B, C = 1, 3, 4, 5


def test_beam_finds_the_better_caption_greedy_misses():
    # Greedy takes A (0.6) and then ends at 0.34: 0.204. B (0.4) then <end> (0.9) gives 0.36.
    decoder = TableDecoder({0: {START: 1.0}, START: {A: 0.6, B: 0.4}, A: {END: 0.34, B: 0.33, C: 0.33},
                            B: {END: 0.9, C: 0.1}, C: {END: 1.0}})
    assert decoder.search(1) == ([START, A, END], pytest.approx(math.log(0.6 * 0.34), abs=1e-4))
    for beam_size in (2, 3, 5):
        assert decoder.search(beam_size) == ([START, B, END], pytest.approx(math.log(0.4 * 0.9), abs=1e-4))


def test_length_penalty_trades_probability_for_length():
    # Short: A <end>, 0.5. Long: B C <end>, 0.5 * 0.9 * 0.9 = 0.405: less likely, but more per token.
    decoder = TableDecoder({0: {START: 1.0}, START: {A: 0.5, B: 0.5}, A: {END: 1.0},
                            B: {C: 0.9, END: 0.1}, C: {END: 0.9, C: 0.1}})
    assert decoder.search(2, length_penalty=0.0)[0] == [START, A, END]
    ids, score = decoder.search(2, length_penalty=1.0)
    assert ids == [START, B, C, END] and score == pytest.approx(math.log(0.405) / 4, abs=1e-4)


def test_a_caption_that_never_ends_is_truncated_like_greedy():
    decoder = TableDecoder({0: {START: 1.0}, START: {A: 1.0}, A: {A: 1.0}}, max_seq_len=5)
    assert decoder.search(3) == ([START, A, A, A, A], pytest.approx(0.0, abs=1e-4))
