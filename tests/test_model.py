import torch

from captioning.model import Captioner
from captioning.params import ModelParams

SMALL = ModelParams(backbone="resnet18", image_size=64, embed_size=16, hidden_size=24, max_seq_len=7)


def test_encoder_decoder_shapes():
    torch.manual_seed(0)
    model = Captioner.build(SMALL, vocab_size=11)
    images = torch.randn(2, 3, 64, 64)
    assert model.encoder(images).shape == (2, 16)
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 2, 0]])
    lengths = torch.tensor([4, 3, 3])
    logits = model(images, captions, lengths, torch.tensor([0, 1, 1]))
    assert logits.shape == (int(lengths.sum()), 11)


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
    model(torch.randn(2, 3, 64, 64), captions, lengths, torch.tensor([0, 1])).sum().backward()
    assert torch.equal(bn.running_mean, before)  # running statistics untouched
    assert all(p.grad is None for p in model.encoder.backbone.parameters())
    assert model.encoder.linear.weight.grad is not None


