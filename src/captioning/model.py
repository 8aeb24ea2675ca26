"""The seed's CNN-LSTM ("Show and Tell") captioner.

Encoder: a torchvision ResNet without its fc layer, then Linear + BatchNorm1d to `embed_size`.
Decoder: Embedding, LSTM, Linear; the image feature is the LSTM's first input step, then the
caption's tokens (teacher forcing). Greedy decoding feeds back the argmax word.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning import accel
from captioning.backbone import backbone_from_state, resnet, trunk
from captioning.params import ModelParams


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, embed_size: int, train_backbone: bool):
        super().__init__()
        self.backbone = trunk(backbone)  # drop fc, keep avgpool
        self.feature_size = backbone.fc.in_features
        self.linear = nn.Linear(self.feature_size, embed_size)
        self.batch_norm = nn.BatchNorm1d(embed_size, momentum=0.01)
        self.train_backbone = train_backbone
        self.backbone.requires_grad_(train_backbone)

    def train(self, mode: bool = True):
        # A frozen backbone stays in eval mode: under no_grad its BatchNorm would still update
        # running statistics in train mode.
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, feature_size) pooled backbone features."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.backbone(images).flatten(1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, feature_size) -> (B, embed_size)."""
        return self.batch_norm(self.linear(pooled))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(images))


class Decoder(nn.Module):
    def __init__(self, embed_size: int, hidden_size: int, vocab_size: int, num_layers: int,
                 max_seq_len: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.max_seq_len = max_seq_len
        # Forget-gate bias 1 (Jozefowicz et al., 2015): the image arrives only at step 0, and the
        # LSTM must remember it to the last object word; the default 0 forgets it early in training.
        with torch.no_grad():
            for name, bias in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    bias[hidden_size:2 * hidden_size].fill_(1.0)  # gate order: input, forget, cell, output

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of the packed targets.

        features (N, E); captions (N, L) padded ids starting with <start>; lengths (N,) sorted
        descending. Returns (sum(lengths), V), in the order of
        `pack_padded_sequence(captions, lengths, batch_first=True).data`.
        """
        embeddings = self.embedding(captions)  # (N, L, E)
        # The image is step 0; the last token's embedding is never an input (nothing follows <end>).
        inputs = torch.cat((features.unsqueeze(1), embeddings), 1)  # (N, L+1, E)
        packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True)
        hiddens, _ = self.lstm(packed)
        return self.linear(hiddens.data)  # (sum(lengths), V)

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, end_id: int) -> torch.Tensor:
        """(B, E) features -> (B, max_seq_len) argmax ids; the first predicted id is <start>.

        Stops early once every caption has produced <end> (after <start>).
        """
        inputs, states = features.unsqueeze(1), None  # (B, 1, E)
        ids = []
        done = torch.zeros(features.size(0), dtype=torch.bool, device=features.device)
        for step in range(self.max_seq_len):
            hiddens, states = self.lstm(inputs, states)  # (B, 1, H)
            predicted = self.linear(hiddens.squeeze(1)).argmax(1)  # (B,)
            ids.append(predicted)
            if step > 0:
                done |= predicted == end_id
                if bool(done.all()):
                    break
            inputs = self.embedding(predicted).unsqueeze(1)  # (B, 1, E)
        return torch.stack(ids, 1)

    def step(self, inputs: torch.Tensor, states) -> tuple[torch.Tensor, tuple]:
        """One decoding step of N sequences: inputs (N, 1, E) -> log-probs (N, V), new LSTM states."""
        hiddens, states = self.lstm(inputs, states)  # (N, 1, H)
        return self.linear(hiddens.squeeze(1)).log_softmax(1), states

    @torch.no_grad()
    def beam_search(self, features: torch.Tensor, end_id: int, beam_size: int,
                    length_penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, E) features -> ((B, L) ids, (B,) scores): the best of `beam_size` beams per image.

        All B * K beams advance together, one LSTM step per token. As in `greedy`, the image is
        step 0 and the first predicted id is <start>; ids after a caption's <end> are <end>, so
        `Vocabulary.decode` reads both alike. A hypothesis scores its summed log-probs (from the
        <start> to the <end> id) divided by its length in ids ** `length_penalty`: 0 keeps the raw
        sum, which favours short captions, 1 is the mean log-prob.

        A beam that predicts <end> leaves the beam (its slot is refilled from the others at the next
        step) and becomes a finished hypothesis of its image. An image is done once its best
        finished hypothesis scores at least what any live beam could still reach (log-probs only
        add negative terms, and the length is at most `max_seq_len`), so stopping early never
        changes the result; the search stops when every image is done. An image with nothing
        finished after `max_seq_len` steps gets its best live beam, truncated as greedy's would be.
        With `beam_size` 1 this is exactly `greedy`.
        """
        batch, k, device = features.size(0), beam_size, features.device
        neg_inf = float("-inf")
        inputs, states = features.repeat_interleave(k, 0).unsqueeze(1), None  # (B*K, 1, E)
        # Summed log-probs of the live beams; -inf = no beam in that slot. At step 0 one beam per
        # image: K copies of the same one would all pick the same tokens.
        scores = features.new_full((batch, k), neg_inf)  # (B, K)
        scores[:, 0] = 0.0
        history = torch.empty(batch * k, 0, dtype=torch.long, device=device)  # (B*K, t) ids so far
        best = features.new_full((batch,), neg_inf)  # (B,) normalised score of the best finished
        best_ids = torch.full((batch, self.max_seq_len), end_id, dtype=torch.long, device=device)
        best_len = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        first_beam = torch.arange(batch, device=device).unsqueeze(1) * k  # (B, 1) row of each image's beam 0
        images = torch.arange(batch, device=device)
        for step in range(self.max_seq_len):
            log_probs, states = self.step(inputs, states)  # (B*K, V)
            vocab_size = log_probs.size(1)
            candidates = (scores.unsqueeze(2) + log_probs.view(batch, k, vocab_size)).view(batch, -1)
            # Candidates of one step have the same length: ranking raw sums is ranking scores.
            top, flat = candidates.topk(k, dim=1)  # (B, K), best first
            rows = (first_beam + flat.div(vocab_size, rounding_mode="floor")).view(-1)  # (B*K,) parent beams
            tokens = flat.remainder(vocab_size)  # (B, K)
            history = torch.cat((history[rows], tokens.view(-1, 1)), 1)  # (B*K, step+1)
            # As in greedy, <end> counts only after the <start> step.
            ended = (tokens == end_id) & top.isfinite() if step > 0 else torch.zeros_like(tokens, dtype=torch.bool)
            finished, which = (top / (step + 1) ** length_penalty).masked_fill(~ended, neg_inf).max(1)  # (B,)
            better = (finished > best) & ~done  # a done image's result is final
            if bool(better.any()):
                best = torch.where(better, finished, best)
                chosen = history.view(batch, k, -1)[images, which]  # (B, step+1)
                best_ids[better] = end_id
                best_ids[better, : step + 1] = chosen[better]
                best_len = torch.where(better, step + 1, best_len)
            scores = top.masked_fill(ended, neg_inf)
            reachable = scores.max(1).values / self.max_seq_len ** length_penalty  # (B,) -inf: no live beam
            done |= best >= reachable
            if bool(done.all()):
                break
            inputs = self.embedding(tokens.view(-1)).unsqueeze(1)  # (B*K, 1, E)
            states = tuple(s.index_select(1, rows) for s in states)  # (layers, B*K, H) each
        unfinished = best == neg_inf  # ran out of steps: the best live beam, truncated
        if bool(unfinished.any()):
            alive, which = scores.max(1)
            best = torch.where(unfinished, alive / history.size(1) ** length_penalty, best)
            best_ids[unfinished, : history.size(1)] = history.view(batch, k, -1)[images, which][unfinished]
            best_len = torch.where(unfinished, history.size(1), best_len)
        return best_ids[:, : int(best_len.max())], best


class Captioner(nn.Module):
    """Encoder + decoder, rebuilt from `config` alone (the checkpoint stores it)."""

    def __init__(self, config: dict, backbone: nn.Module | None = None):
        super().__init__()
        self.config = dict(config)
        params = ModelParams(**{k: v for k, v in config.items() if k != "vocab_size"})
        if backbone is None:  # weights come from a checkpoint: no need for ImageNet ones
            backbone = resnet(params.backbone)
        self.encoder = Encoder(backbone, params.embed_size, params.train_backbone)
        self.decoder = Decoder(params.embed_size, params.hidden_size, config["vocab_size"],
                               params.num_layers, params.max_seq_len)

    @classmethod
    def build(cls, params: ModelParams, vocab_size: int, backbone_state: dict | None = None) -> "Captioner":
        """A new model for training, its backbone from `backbone_state` (the pretrain stage's
        output: every layer but fc), else with random weights."""
        backbone = resnet(params.backbone) if backbone_state is None else backbone_from_state(params, backbone_state)
        return cls({**asdict(params), "vocab_size": vocab_size}, backbone=backbone)

    def forward(self, inputs, captions, lengths, image_index, pooled: bool = False):
        """Logits for the packed targets; `image_index[n]` is the image of caption n.

        `inputs` are images (B, 3, S, S), or with `pooled` the backbone's cached pooled output
        (B, F). The encoder runs once per image, however many captions it has in the batch.
        """
        features = (self.encoder.head if pooled else self.encoder)(inputs)[image_index]  # (N, E)
        return self.decoder(features, captions, lengths)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, end_id: int, *, beam_size: int, length_penalty: float,
                 bf16: bool) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, L) ids: greedy for `beam_size` 1 (the same ids, less
        bookkeeping), else `Decoder.beam_search`. `bf16`: the encoder under bf16 autocast on CUDA
        (as in training); the decoder stays in float32, since beam scores add up many log-probs."""
        with accel.autocast(images.device, bf16):
            features = self.encoder(images)  # (B, E)
        features = features.float()
        if beam_size == 1:
            return self.decoder.greedy(features, end_id)
        return self.decoder.beam_search(features, end_id, beam_size, length_penalty)[0]
