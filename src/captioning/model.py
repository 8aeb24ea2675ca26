"""The captioners: the seed's CNN-LSTM ("Show and Tell") and Show, Attend and Tell's soft attention.

Encoder: a torchvision ResNet without its fc layer (`captioning.backbone`). With the seed's LSTM
decoder (`model.decoder: lstm`) it ends in the average pool, then Linear + BatchNorm1d to
`embed_size`; with attention it stops after the stage `model.grid_layer` and hands the decoder
that feature map as a grid (B, P, F), one F-vector per cell: P = (image_size / 16) ** 2 for
layer3, (image_size / 32) ** 2 for layer4, the last.

Decoders:
- `Decoder`, the seed's: Embedding, LSTM, Linear; the image feature is the LSTM's first input
  step, then the caption's tokens (teacher forcing).
- `AttentionDecoder`, Xu et al. (2015): an LSTMCell that, before each word, attends over the grid
  (soft attention, gated by beta) and reads the attended context beside the previous word. Its
  state starts from the grid's mean.

Both decode through the same `greedy` and `beam_search` (`CaptionSearch`), which only need each
decoder's `start`, `step` and `reorder`; both predict <start> at step 0, so the packed targets,
the loss and `Vocabulary.decode` are the same for both.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning import accel
from captioning.backbone import backbone_from_state, channels, grid_trunk, resnet, trunk
from captioning.params import ModelParams


class Encoder(nn.Module):
    """The CNN, then (LSTM decoder) Linear + BatchNorm1d of its pooled output, or (attention,
    `grid_layer` set) the feature map of that stage as it is: the attention decoder projects the
    grid itself."""

    def __init__(self, backbone: nn.Module, embed_size: int, train_backbone: bool, grid_layer: str | None = None):
        super().__init__()
        self.grid = grid_layer is not None
        if self.grid:
            self.feature_size = channels(backbone, grid_layer)
            self.backbone = grid_trunk(backbone, grid_layer)  # the weights keep their names either way
        else:
            self.feature_size = backbone.fc.in_features
            self.backbone = trunk(backbone)
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

    def cnn(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> the backbone's output as the features stage caches it: pooled
        (B, F), or the grid (B, P, F)."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            out = self.backbone(images)
        return out.flatten(2).transpose(1, 2) if self.grid else out.flatten(1)

    def head(self, cnn: torch.Tensor) -> torch.Tensor:
        """The backbone's output -> the decoder's input: (B, F) -> (B, embed_size); a grid as it is."""
        return cnn if self.grid else self.batch_norm(self.linear(cnn))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.cnn(images))


class CaptionSearch(nn.Module):
    """Greedy and beam-search decoding for any decoder that provides

    - `start(features)`: the decoding state of N images;
    - `step(state, tokens)`: next-token logits (N, V) and the new state; `tokens` (N,) are the ids
      just chosen, None at step 0 (whose prediction is <start>);
    - `reorder(state, rows)`: the state of the sequences `rows` (N,), for beam search.
    """

    max_seq_len: int

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, end_id: int) -> torch.Tensor:
        """Features of B images -> (B, max_seq_len) argmax ids; the first predicted id is <start>.

        Stops early once every caption has produced <end> (after <start>).
        """
        state, tokens, ids = self.start(features), None, []
        done = torch.zeros(features.size(0), dtype=torch.bool, device=features.device)
        for step in range(self.max_seq_len):
            logits, state = self.step(state, tokens)
            tokens = logits.argmax(1)  # (B,)
            ids.append(tokens)
            if step > 0:
                done |= tokens == end_id
                if bool(done.all()):
                    break
        return torch.stack(ids, 1)

    def sample(self, features: torch.Tensor, start_id: int, end_id: int, samples: int,
               generator: torch.Generator | None = None,
               length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`samples` captions drawn from the model for each of B images, with gradients: (ids,
        log-probabilities, mask), each (B * samples, L <= `length`, by default max_seq_len - 1),
        image by image. Step 0 is <start>, given; the ids are the words after it. The mask holds
        each caption's words up to and including its first <end>, so that ending a caption is
        rewarded (or punished) like any word."""
        return self.rollout(features.repeat_interleave(samples, 0), start_id, end_id,
                            lambda logits, _: torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0],
                            length or self.max_seq_len - 1)

    def log_probs(self, features: torch.Tensor, start_id: int, end_id: int,
                  ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-probabilities and mask of given captions `ids` (N, L) of N images, as `sample` gives them."""
        _, log_probs, mask = self.rollout(features, start_id, end_id, lambda _, t: ids[:, t], ids.size(1),
                                          stop_early=False)
        return log_probs, mask

    def rollout(self, features: torch.Tensor, start_id: int, end_id: int, choose, length: int,
                stop_early: bool = True):
        """Decode N captions of at most `length` words after <start>, each next word
        `choose(logits, t)`: (ids, their log-probabilities, mask), each (N, length), or shorter
        once every caption has ended (`stop_early`). Probabilities are float32, under autocast too."""
        _, state = self.step(self.start(features), None)
        tokens = torch.full((features.size(0),), start_id, dtype=torch.long, device=features.device)
        ids, log_probs, mask = [], [], []
        alive = torch.ones_like(tokens, dtype=torch.bool)
        for t in range(length):
            logits, state = self.step(state, tokens)
            logits = logits.float()
            tokens = choose(logits, t)
            ids.append(tokens)
            log_probs.append(logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])
            mask.append(alive)
            alive = alive & (tokens != end_id)
            if stop_early and not bool(alive.any()):
                break
        return torch.stack(ids, 1), torch.stack(log_probs, 1), torch.stack(mask, 1)

    @torch.no_grad()
    def beam_search(self, features: torch.Tensor, end_id: int, beam_size: int,
                    length_penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of B images -> ((B, L) ids, (B,) scores): the best of `beam_size` beams per image.

        All B * K beams advance together, one decoder step per token. As in `greedy`, the first
        predicted id is <start>; ids after a caption's <end> are <end>, so `Vocabulary.decode`
        reads both alike. A hypothesis scores its summed log-probs (from the <start> to the <end>
        id) divided by its length in ids ** `length_penalty`: 0 keeps the raw sum, which favours
        short captions, 1 is the mean log-prob.

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
        state, tokens = self.start(features.repeat_interleave(k, 0)), None  # B*K sequences
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
            logits, state = self.step(state, tokens)
            log_probs = logits.log_softmax(1)  # (B*K, V)
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
            tokens = tokens.view(-1)  # (B*K,)
            state = self.reorder(state, rows)
        unfinished = best == neg_inf  # ran out of steps: the best live beam, truncated
        if bool(unfinished.any()):
            alive, which = scores.max(1)
            best = torch.where(unfinished, alive / history.size(1) ** length_penalty, best)
            best_ids[unfinished, : history.size(1)] = history.view(batch, k, -1)[images, which][unfinished]
            best_len = torch.where(unfinished, history.size(1), best_len)
        return best_ids[:, : int(best_len.max())], best


class Decoder(CaptionSearch):
    """The seed's decoder: the image (B, E) is the LSTM's input at step 0, then the words."""

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

    def forward(self, features: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Teacher-forced logits of the packed targets, and no regulariser.

        features (N, E); captions (N, L) padded ids starting with <start>; lengths (N,) sorted
        descending. The logits are (sum(lengths), V), in the order of
        `pack_padded_sequence(captions, lengths, batch_first=True).data`.
        """
        embeddings = self.embedding(captions)  # (N, L, E)
        # The image is step 0; the last token's embedding is never an input (nothing follows <end>).
        inputs = torch.cat((features.unsqueeze(1), embeddings), 1)  # (N, L+1, E)
        packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True)
        hiddens, _ = self.lstm(packed)
        return self.linear(hiddens.data), None  # (sum(lengths), V)

    def start(self, features: torch.Tensor):
        return features.unsqueeze(1), None  # (next input (N, 1, E), LSTM states)

    def step(self, state, tokens: torch.Tensor | None):
        inputs, states = state
        if tokens is not None:
            inputs = self.embedding(tokens).unsqueeze(1)  # (N, 1, E)
        hiddens, states = self.lstm(inputs, states)  # (N, 1, H)
        return self.linear(hiddens.squeeze(1)), (None, states)

    def reorder(self, state, rows: torch.Tensor):
        return None, tuple(s.index_select(1, rows) for s in state[1])  # (layers, N, H) each


class AttentionDecoder(CaptionSearch):
    """Show, Attend and Tell's soft-attention decoder (Xu et al. 2015, section 3.1.2 and 4.2.1).

    Before each word the LSTMCell's hidden state scores every grid cell (additive attention),
    the softmax of the scores weighs the cells into a context vector, and a gate beta =
    sigmoid(f_beta(h)) scales it; the cell then reads [previous word; context]. h and c start
    from the grid's mean. Step 0 has no previous word (a zero vector) and predicts <start>.
    """

    def __init__(self, feature_size: int, embed_size: int, hidden_size: int, attention_size: int,
                 vocab_size: int, max_seq_len: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.key = nn.Linear(feature_size, attention_size)  # the grid's side of the attention score
        self.query = nn.Linear(hidden_size, attention_size)
        self.score = nn.Linear(attention_size, 1)
        self.init_h = nn.Linear(feature_size, hidden_size)
        self.init_c = nn.Linear(feature_size, hidden_size)
        self.gate = nn.Linear(hidden_size, feature_size)  # f_beta
        self.cell = nn.LSTMCell(embed_size + feature_size, hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.max_seq_len = max_seq_len

    def start(self, grid: torch.Tensor):
        """grid (N, P, F) -> the state (grid, its attention keys, h, c, last weights)."""
        mean = grid.mean(1)
        h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        return grid, self.key(grid), h, c, None

    def advance(self, grid: torch.Tensor, keys: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of the cell: h scores the cells, the gated context is read beside `words` (the
        previous word's embedding) -> the new h, c and this step's weights alpha (N, P)."""
        scores = self.score(torch.tanh(keys + self.query(h).unsqueeze(1))).squeeze(2)  # (N, P)
        alpha = scores.softmax(1)
        context = torch.sigmoid(self.gate(h)) * (alpha.unsqueeze(2) * grid).sum(1)  # (N, F)
        h, c = self.cell(torch.cat((words, context), 1), (h, c))
        return h, c, alpha

    def no_word(self, h: torch.Tensor) -> torch.Tensor:
        return h.new_zeros(h.size(0), self.embedding.embedding_dim)  # step 0's input: no previous word

    def step(self, state, tokens: torch.Tensor | None):
        grid, keys, h, c, _ = state
        h, c, alpha = self.advance(grid, keys, h, c, self.no_word(h) if tokens is None else self.embedding(tokens))
        return self.linear(h), (grid, keys, h, c, alpha)

    def reorder(self, state, rows: torch.Tensor):
        grid, keys, h, c, alpha = state
        # Beam search reorders within each image's block of beams, whose grid rows are equal: only
        # the recurrent state moves.
        return grid, keys, h[rows], c[rows], alpha

    def attend(self, grid: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing over whole captions: (N, L, V) logits and (N, L, P) attention weights,
        step t predicting captions[:, t] from captions[:, t - 1] (for `Captioner.attention_maps`)."""
        state, logits, alphas = self.start(grid), [], []
        for t in range(captions.size(1)):
            out, state = self.step(state, captions[:, t - 1] if t else None)
            logits.append(out)
            alphas.append(state[4])
        return torch.stack(logits, 1), torch.stack(alphas, 1)

    def forward(self, grid: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits of the packed targets (as `Decoder.forward`) and the doubly
        stochastic regulariser.

        As the LSTM decoder's packed sequence does, step t runs only the captions still going
        (lengths sorted descending: the first `batch_sizes[t]` rows), so padding costs nothing:
        synthetic captions are much shorter on average than the longest of their batch, so running
        every row to the longest would spend most steps on padding (docs/model.md). The hidden
        states of step after step, so trimmed, are the targets' packed order, and the output layer
        runs once.

        Softmax makes each step's weights sum to 1 over the cells; the regulariser asks the
        weights of each cell, summed over the caption's steps, to come near tau, so that every
        part of the image gets attention in some word. Xu et al. suggest tau >= L/P; tau = L/P
        (an even share) makes it 0 for a one-cell grid and independent of caption length.
        """
        batch_sizes = pack_padded_sequence(captions, lengths.cpu(), batch_first=True).batch_sizes.tolist()
        words = self.embedding(captions)  # (N, L, E): all steps' inputs at once
        _, keys, h, c, _ = self.start(grid)
        hiddens, per_cell = [], grid.new_zeros(grid.shape[:2])  # (N, P): each cell's weight summed over steps
        for t, n in enumerate(batch_sizes):
            h, c, alpha = self.advance(grid[:n], keys[:n], h[:n], c[:n], words[:n, t - 1] if t else self.no_word(h[:n]))
            hiddens.append(h)
            per_cell = per_cell + nn.functional.pad(alpha, (0, 0, 0, grid.size(0) - n))
        tau = lengths.to(per_cell).unsqueeze(1) / per_cell.size(1)  # (N, 1)
        return self.linear(torch.cat(hiddens)), ((per_cell - tau) ** 2).mean()


class Captioner(nn.Module):
    """Encoder + decoder, rebuilt from `config` alone (the checkpoint stores it)."""

    def __init__(self, config: dict, backbone: nn.Module | None = None):
        super().__init__()
        self.config = dict(config)
        params = ModelParams(**{k: v for k, v in self.config.items() if k != "vocab_size"})
        if backbone is None:  # weights come from a checkpoint: no need for ImageNet ones
            backbone = resnet(params.backbone)
        attention = params.decoder == "attention"
        self.encoder = Encoder(backbone, params.embed_size, params.train_backbone,
                               grid_layer=params.grid_layer if attention else None)
        if attention:
            self.decoder = AttentionDecoder(self.encoder.feature_size, params.embed_size, params.hidden_size,
                                            params.attention_size, config["vocab_size"], params.max_seq_len)
        else:
            self.decoder = Decoder(params.embed_size, params.hidden_size, config["vocab_size"],
                                   params.num_layers, params.max_seq_len)

    @classmethod
    def build(cls, params: ModelParams, vocab_size: int, backbone_state: dict | None = None) -> "Captioner":
        """A new model for training, its backbone from `backbone_state` (the pretrain stage's
        output: every layer but fc), else with random weights."""
        backbone = resnet(params.backbone) if backbone_state is None else backbone_from_state(params, backbone_state)
        return cls({**asdict(params), "vocab_size": vocab_size}, backbone=backbone)

    def forward(self, inputs, captions, lengths, image_index, cached: bool = False):
        """(logits for the packed targets, the decoder's regulariser or None); `image_index[n]` is
        the image of caption n.

        `inputs` are images (B, 3, S, S), or with `cached` the backbone's cached output (pooled
        (B, F) or grid (B, P, F)). The encoder runs once per image, however many captions it has.
        """
        features = (self.encoder.head if cached else self.encoder)(inputs)[image_index]
        return self.decoder(features, captions, lengths)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, end_id: int, *, beam_size: int, length_penalty: float,
                 bf16: bool) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, L) ids: greedy for `beam_size` 1 (the same ids, less
        bookkeeping), else `CaptionSearch.beam_search`. `bf16`: the encoder under bf16 autocast on CUDA
        (as in training); the decoder stays in float32, since beam scores add up many log-probs."""
        with accel.autocast(images.device, bf16):
            features = self.encoder(images)
        features = features.float()
        if beam_size == 1:
            return self.decoder.greedy(features, end_id)
        return self.decoder.beam_search(features, end_id, beam_size, length_penalty)[0]

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, h, w) attention weights of an attention captioner as it produced `ids` (B, L)
        (`generate`'s output): teacher forcing on its own words retraces its decoding."""
        if not isinstance(self.decoder, AttentionDecoder):
            raise ValueError("attention maps need a captioner with model.decoder: attention")
        grid = self.encoder(images).float()  # (B, P, F)
        _, alphas = self.decoder.attend(grid, ids)
        side = round(grid.size(1) ** 0.5)  # crops are square
        return alphas.view(*ids.shape, side, side)
