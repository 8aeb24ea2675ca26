import numpy as np
import pytest
import torch
from PIL import Image

from captioning.model import AttentionDecoder, Captioner
from captioning.params import ModelParams

SMALL = ModelParams(backbone="resnet18", image_size=64, embed_size=16, hidden_size=24, max_seq_len=7)


def test_encoder_decoder_shapes():
    torch.manual_seed(0)
    model = Captioner.build(SMALL, vocab_size=11)
    images = torch.randn(2, 3, 64, 64)
    assert model.encoder(images).shape == (2, 16)
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 2, 0]])
    lengths = torch.tensor([4, 3, 3])
    logits, penalty = model(images, captions, lengths, torch.tensor([0, 1, 1]))
    assert logits.shape == (int(lengths.sum()), 11) and penalty is None


def test_greedy_decoding_shape_and_early_stop():
    torch.manual_seed(0)
    model = Captioner.build(SMALL, vocab_size=11).eval()
    ids = model.generate(torch.randn(3, 3, 64, 64), end_id=2, beam_size=1, length_penalty=0.0, bf16=False)  # beam 1: greedy
    assert ids.shape[0] == 3 and 1 <= ids.shape[1] <= 7
    # A decoder that always predicts <end> stops after <start> + one step.
    with torch.no_grad():
        model.decoder.linear.weight.zero_()
        model.decoder.linear.bias.copy_(torch.arange(11) == 2)
    assert model.generate(torch.randn(3, 3, 64, 64), end_id=2, beam_size=1, length_penalty=0.0, bf16=False).shape == (3, 2)


def test_frozen_backbone_stays_in_eval_mode_and_gets_no_gradient():
    torch.manual_seed(0)
    model = Captioner.build(ModelParams(**{**SMALL.__dict__, "train_backbone": False}), vocab_size=11)
    model.train()
    bn = model.encoder.backbone[1]
    assert not bn.training and model.encoder.batch_norm.training
    before = bn.running_mean.clone()
    captions, lengths = torch.tensor([[1, 5, 2], [1, 6, 2]]), torch.tensor([3, 3])
    model(torch.randn(2, 3, 64, 64), captions, lengths, torch.tensor([0, 1]))[0].sum().backward()
    assert torch.equal(bn.running_mean, before)  # running statistics untouched
    assert all(p.grad is None for p in model.encoder.backbone.parameters())
    assert model.encoder.linear.weight.grad is not None




ATTENTION = ModelParams(**{**SMALL.__dict__, "decoder": "attention", "attention_size": 8, "image_size": 96,
                           "grid_layer": "layer4"})


def test_the_grid_is_the_map_of_model_grid_layer_with_the_weights_named_as_in_the_whole_cnn():
    torch.manual_seed(0)
    full = Captioner.build(ATTENTION, vocab_size=11)  # layer4: at 32 px one cell
    model = Captioner.build(ModelParams(**{**ATTENTION.__dict__, "grid_layer": "layer3"}), vocab_size=11)
    model.encoder.backbone.load_state_dict(full.encoder.backbone.state_dict(), strict=False)
    images = torch.randn(2, 3, 32, 32)
    assert full.encoder(images).shape == (2, 1, 512)
    grid = model.encoder(images)
    assert grid.shape == (2, 4, 256) and model.decoder.key.in_features == 256  # 32 px / 16: 2 x 2 cells of layer3
    feature_map = full.encoder.backbone[:-1](images)  # the same weights, stopped after layer3
    assert torch.equal(grid[:, 2 * 1 + 0], feature_map[:, :, 1, 0])
    names = set(model.encoder.backbone.state_dict())
    assert names < set(full.encoder.backbone.state_dict()) and not any(n.startswith("7.") for n in names)


def test_attention_training_runs_each_caption_only_for_its_own_steps_and_loses_nothing():
    """The packed forward (each step only the captions still going) gives the logits and the
    regulariser of running every caption to the longest and dropping the padding after."""
    torch.manual_seed(0)
    decoder = AttentionDecoder(6, 5, 8, 4, 11, 9)
    grid = torch.randn(4, 3, 6)
    lengths = torch.tensor([6, 4, 4, 2])
    captions = torch.randint(3, 11, (4, 6)) * (torch.arange(6) < lengths.unsqueeze(1))  # padded with 0
    with torch.no_grad():
        logits, penalty = decoder(grid, captions, lengths)
        padded, alphas = decoder.attend(grid, captions)
    packed = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=True).data
    assert torch.allclose(logits, packed, atol=1e-6)
    per_cell = (alphas * (torch.arange(6) < lengths.unsqueeze(1)).unsqueeze(2)).sum(1)  # (N, P) over real steps
    assert float(penalty) == pytest.approx(float(((per_cell - lengths.unsqueeze(1) / 3) ** 2).mean()), rel=1e-5)
    # What a padded step would compute never reaches the loss.
    other = captions.clone()
    other[3, 2:] = 7
    assert torch.equal(decoder(grid, other, lengths)[0].detach(), logits)


def test_attention_encoder_hands_over_the_grid_and_the_decoder_reads_it_every_word():
    torch.manual_seed(0)
    model = Captioner.build(ATTENTION, vocab_size=11)
    images = torch.randn(2, 3, 96, 96)
    grid = model.encoder(images)
    assert grid.shape == (2, 9, 512)  # 96 px / 32 = 3 x 3 cells of the last feature map
    assert not hasattr(model.encoder, "linear")  # no pooled head: the decoder projects the grid
    # The cells are the last feature map's, row-major, and their mean is the LSTM's pooled input.
    feature_map = model.encoder.backbone(images)
    assert torch.equal(grid[:, 3 * 1 + 2], feature_map[:, :, 1, 2])
    pooled = Captioner.build(SMALL, vocab_size=11).encoder
    pooled.backbone.load_state_dict(model.encoder.backbone.state_dict())
    assert torch.allclose(pooled.cnn(images), grid.mean(1), atol=1e-6)
    captions, lengths = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]), torch.tensor([4, 3])
    logits, penalty = model(images, captions, lengths, torch.tensor([0, 1]))
    assert logits.shape == (7, 11) and penalty.ndim == 0
    (logits.sum() + penalty).backward()
    assert model.decoder.score.weight.grad.abs().sum() > 0  # the attention itself learns
    # A word's logits depend on the image at that step, not only through step 0: changing one
    # cell changes the attention weights of every step.
    _, alphas = model.decoder.attend(grid.detach(), captions)
    moved = grid.detach().clone()
    moved[:, 0] += 5
    _, alphas2 = model.decoder.attend(moved, captions)
    assert alphas.shape == (2, 4, 9) and torch.allclose(alphas.sum(2), torch.ones(2, 4))
    assert (alphas2 - alphas).abs()[:, 1:].amax() > 1e-3


def test_doubly_stochastic_penalty_is_zero_for_an_even_share_and_grows_with_neglect():
    decoder = AttentionDecoder(4, 6, 8, 5, 11, 7)
    lengths = torch.tensor([4, 2])
    captions = torch.tensor([[1, 5, 6, 2], [1, 2, 0, 0]])
    with torch.no_grad():  # scores = 0 for every cell: each step's weights are uniform
        decoder.score.weight.zero_()
        decoder.score.bias.zero_()
    _, even = decoder(torch.randn(2, 4, 4), captions, lengths)
    assert float(even.detach()) == pytest.approx(0.0, abs=1e-12)
    one_cell = AttentionDecoder(4, 6, 8, 5, 11, 7)  # a 1-cell grid: all weight on it, nothing to regularise
    assert float(one_cell(torch.randn(2, 1, 4), captions, lengths)[1].detach()) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():  # cell 0 alone scores high: all attention goes there, the others are neglected
        decoder.key.weight.zero_()
        decoder.key.weight[0, 0] = 1.0
        decoder.query.weight.zero_()
        decoder.score.weight.zero_()
        decoder.score.weight[0, 0] = 50.0
    grid = torch.zeros(2, 4, 4)
    grid[:, 0, 0] = 10.0
    _, alphas = decoder.attend(grid, captions)
    assert float(alphas[..., 0].min().detach()) > 0.999
    # Summed over the steps of each caption (4 and 2), cell 0 gets 4 and 2, the others 0, against
    # an even share of 1 and 0.5.
    expected = ((3 ** 2 + 3 * 1) + (1.5 ** 2 + 3 * 0.25)) / 8
    assert float(decoder(grid, captions, lengths)[1].detach()) == pytest.approx(expected, rel=1e-3)


def test_attention_maps_retrace_the_decoding_and_make_a_readable_figure():
    from captioning.report import attention_figure

    torch.manual_seed(0)
    model = Captioner.build(ATTENTION, vocab_size=11).eval()
    images = torch.randn(2, 3, 96, 96)
    ids = model.generate(images, end_id=2, beam_size=1, length_penalty=0.0, bf16=False)
    maps = model.attention_maps(images, ids)
    assert maps.shape == (*ids.shape, 3, 3) and torch.allclose(maps.sum((2, 3)), torch.ones(ids.shape))
    # Teacher forcing on its own greedy words predicts those words again: the same computation.
    logits, _ = model.decoder.attend(model.encoder(images), ids)
    assert torch.equal(logits.argmax(2), ids)
    picture = Image.fromarray(np.full((50, 50, 3), 200, np.uint8))
    figure = attention_figure(picture, ["a", "red", "circle"], maps[0, :3].numpy(), side=40, per_row=2)
    assert figure.size == (80, 2 * (40 + 16))
    pixels = np.asarray(figure)[:40, :40].astype(int)  # first panel: lit where attended, dimmed elsewhere
    weights = maps[0, 0].numpy()
    lit, dim = np.unravel_index(weights.argmax(), weights.shape), np.unravel_index(weights.argmin(), weights.shape)
    centre = lambda cell: pixels[int((cell[0] + 0.5) * 40 / 3), int((cell[1] + 0.5) * 40 / 3)]  # noqa: E731
    assert centre(lit)[0] > centre(dim)[0]
    with pytest.raises(ValueError, match="model.decoder: attention"):
        Captioner.build(SMALL, vocab_size=11).attention_maps(images, ids)
