"""The training loop on a tiny real dataset: it learns, it checkpoints, it resumes exactly."""

import copy
import dataclasses
import math

import pytest
import torch

from captioning.accel import Runtime
from captioning.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioning.layout import read_split
from captioning.model import Captioner
from captioning.params import LR_SCHEDULES, ComputeParams, ModelParams, ParamsError, TrainParams
from captioning.predict import Decoding, caption_images
from captioning.synthetic import scene_scores
from captioning.text import Vocabulary
from captioning.training import fit, training_data
from conftest import Recorder

MODEL = ModelParams(backbone="resnet18", image_size=32, embed_size=32, hidden_size=48, train_backbone=True)
# All 5 captions of an image per step: 8 images a batch, 6 steps an epoch on the 48 train images.
TRAIN = TrainParams(epochs=2, batch_size=40, captions_per_image=0, lr=0.003, log_every=1, checkpoint_every=2,
                    select_metric="cider")
INLINE = Runtime(compute=ComputeParams(num_workers=0))  # tiny images: worker processes would only add start-up


def _setup(tiny_data):
    train = read_split(tiny_data, "train")
    val = read_split(tiny_data, "val")
    vocab = Vocabulary.build([c for cs in train.captions.values() for c in cs], 1)
    torch.manual_seed(0)
    return train, val, vocab, Captioner.build(MODEL, len(vocab))


def _fit(model, vocab, train, val, params, callbacks, resume=None, scenes=True):
    data = training_data(vocab, train, val, MODEL.image_size, params, scene_scores=scene_scores if scenes else None)
    return fit(model, data, params, seed=0, runtime=INLINE, callbacks=callbacks,
               resume_path=resume)


def test_fit_learns_and_reports_each_epoch(tiny_data):
    train, val, vocab, model = _setup(tiny_data)
    logs = Recorder()
    result = _fit(model, vocab, train, val, dataclasses.replace(TRAIN, epochs=5), logs)
    assert [r["epoch"] for r in logs.epochs] == [1, 2, 3, 4, 5]
    first, last = (sum(r["loss"] for r in rows) / 3 for rows in (logs.steps[:3], logs.steps[-3:]))
    assert last < first * 0.85  # 30 steps: the language model starts to form
    for key in ("val_loss", "cider", "bleu_4", "grounded"):
        assert key in logs.epochs[0]
    assert result.steps == len(logs.steps)
    # the epoch kept is the first with the best select_metric (cider here, higher is better)
    best = max(logs.epochs, key=lambda r: (r["cider"], -r["epoch"]))
    assert result.best_epoch == best["epoch"] and result.best["cider"] == best["cider"]
    assert result.history == [{k: v for k, v in r.items() if k != "best_epoch"} for r in logs.epochs]


def test_the_epoch_kept_has_the_lowest_val_loss_and_its_weights(tiny_data):
    from captioning.training import validate

    train, val, vocab, model = _setup(tiny_data)
    # Where val_loss turns up again depends on the CPU's rounding (on some hosts it still falls at
    # epoch 10): that the best epoch, not the last, is kept is checked row by row below.
    params = dataclasses.replace(TRAIN, epochs=10, lr=0.1, select_metric="val_loss")
    logs = Recorder()
    result = _fit(model, vocab, train, val, params, logs)
    losses = [r["val_loss"] for r in logs.epochs]
    assert result.best_epoch == 1 + losses.index(min(losses))  # lower is better for val_loss
    model.load_state_dict(result.best_state)  # the weights kept are that epoch's, not the last
    data = training_data(vocab, train, val, MODEL.image_size, params)
    assert validate(model, data, torch.device("cpu"))["val_loss"] == pytest.approx(min(losses), rel=1e-6)


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_every_schedule_trains_for_any_number_of_steps(tiny_data, schedule, steps):
    """A one-epoch run of 1 to 5 steps (48 train images, one caption each, in `steps` batches)."""
    train, val, vocab, model = _setup(tiny_data)
    params = dataclasses.replace(TRAIN, epochs=1, batch_size=math.ceil(48 / steps), captions_per_image=1,
                                 schedule=schedule)
    result = _fit(model, vocab, train, val, params, Recorder(), scenes=False)
    assert result.steps == steps and result.final_train_loss == result.final_train_loss  # not NaN


@pytest.mark.parametrize("metric, values, kept", [("val_loss", [3.0, 2.0, 2.5], 2), ("cider", [0.1, 0.4, 0.3], 2),
                                                  ("last", [3.0, 2.0, 2.5], 3)])
def test_the_kept_epoch_holds_that_epochs_weights(metric, values, kept):
    from captioning.training import ResumeState

    state, layer = ResumeState(), torch.nn.Linear(1, 1)
    for epoch, value in enumerate(values, 1):
        torch.nn.init.constant_(layer.weight, float(epoch))  # each epoch's weights say its number
        state.keep_if_best({"epoch": epoch, "val_loss": value, "cider": value}, layer, metric)
    assert state.best_epoch == kept and float(state.best_state["weight"]) == kept
    assert state.stale_epochs == len(values) - kept


def test_select_metric_last_keeps_the_last_epoch_as_the_seed_does(tiny_data):
    train, val, vocab, model = _setup(tiny_data)
    params = dataclasses.replace(TRAIN, epochs=10, lr=0.1, select_metric="last")
    result = _fit(model, vocab, train, val, params, Recorder())
    assert result.best_epoch == 10 and result.best == result.history[-1]
    final = model.state_dict()
    assert all(torch.equal(value, final[key]) for key, value in result.best_state.items())
    with pytest.raises(ParamsError, match="train.patience is 2, but train.select_metric last never improves"):
        TrainParams(select_metric="last", patience=2).check()


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_resume_after_a_kill_ends_with_identical_weights(tiny_data, tmp_path, schedule):
    params = dataclasses.replace(TRAIN, schedule=schedule)  # onecycle: the rate moves every step
    train, val, vocab, model = _setup(tiny_data)
    straight = _fit(model, vocab, train, val, params, Recorder())

    resume = tmp_path / "resume.pt"
    _, _, _, model = _setup(tiny_data)
    with pytest.raises(KeyboardInterrupt):  # killed mid-epoch 2, after the step-4 checkpoint
        _fit(model, vocab, train, val, params, Recorder(stop_at=5), resume)
    assert resume.is_file()
    _, _, _, fresh = _setup(tiny_data)
    resumed = _fit(fresh, vocab, train, val, params, Recorder(), resume)
    assert resumed.steps == straight.steps
    for key, value in straight.best_state.items():
        assert torch.equal(value, resumed.best_state[key]), key
    assert resumed.history == straight.history


def test_checkpoint_round_trip_is_self_describing(tiny_data, tmp_path):
    train, val, vocab, model = _setup(tiny_data)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, vocab, {"seed": 0})
    raw = torch.load(path, weights_only=True)  # plain data only: safe to load
    assert raw["config"]["embed_size"] == 32 and raw["vocab"] == vocab.words
    loaded, loaded_vocab, params = load_checkpoint(path)
    assert loaded_vocab == vocab and params == {"seed": 0}
    paths = [train.image_path(r) for r in train.images[:5]]
    greedy = Decoding(beam_size=1, length_penalty=0.0, bf16=False)
    assert caption_images(model.eval(), vocab, paths, torch.device("cpu"), greedy, progress=False) == \
        caption_images(loaded, loaded_vocab, paths, torch.device("cpu"), greedy, progress=False)


def test_a_format_1_checkpoint_still_loads_attending_over_layer4(tmp_path):
    """Format 1 predates model.grid_layer: its configs name no layer, and its attention decoders
    attended over layer4 (512 channels for resnet18)."""
    torch.manual_seed(0)
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "circle"])
    params = ModelParams(image_size=32, embed_size=8, hidden_size=8, decoder="attention", attention_size=8,
                         grid_layer="layer4")
    model = Captioner.build(params, len(vocab))
    path = tmp_path / "old.pt"
    config = {k: v for k, v in model.config.items() if k != "grid_layer"}
    torch.save({"format": 1, "config": config, "vocab": vocab.words, "params": {"seed": 1},
                "state_dict": model.state_dict()}, path)
    loaded, _, params_back = load_checkpoint(path)
    assert loaded.config["grid_layer"] == "layer4" and loaded.encoder.feature_size == 512 and params_back == {"seed": 1}
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    torch.save({"format": 3, "config": config}, path)
    with pytest.raises(CheckpointError, match="not a captioning checkpoint of format 1 or 2"):
        load_checkpoint(path)


def test_missing_checkpoint_says_which_stage_makes_it(tmp_path):
    with pytest.raises(CheckpointError, match="ce.pt: no checkpoint; the train stage writes it: dvc repro train"):
        load_checkpoint(tmp_path / "ce.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt: no checkpoint; the scst stage writes it: dvc repro scst"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="nope.pt: no checkpoint$"):
        load_checkpoint(tmp_path / "nope.pt")


def test_early_stopping_after_patience_epochs_without_improvement(tiny_data):
    train, val, vocab, model = _setup(tiny_data)
    logs = Recorder()
    # An untrained model names no object: grounded stays 0, so only epoch 1 counts as best.
    frozen = dataclasses.replace(TRAIN, epochs=6, lr=1e-12, patience=2, select_metric="grounded")
    result = _fit(model, vocab, train, val, frozen, logs)
    assert len(logs.epochs) == 3  # epoch 1 sets the best; 2 and 3 do not beat it
    assert result.best_epoch == 1


def test_caption_cli_on_a_folder_of_mixed_modes(tiny_data, tmp_path, capsys):
    from PIL import Image

    from captioning.predict import main

    train, val, vocab, model = _setup(tiny_data)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, vocab, {})
    Decoding(beam_size=1, length_penalty=0.0, bf16=False).save(tmp_path / "decoding.json")  # what evaluate writes beside it
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(train.image_path(train.images[0])).convert("RGBA").save(folder / "a.png")
    Image.open(train.image_path(train.images[1])).convert("L").save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    main([str(folder), "--checkpoint", str(path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(folder / "a.png"), str(folder / "b.jpg")]


def test_a_score_that_does_not_apply_is_absent_not_nan(tiny_data, tmp_path):
    """Without scenes (any real dataset) there is no grounded score: no key, never NaN, which
    JSON.parse and other readers of DVC metrics reject."""
    import json
    import math

    from captioning.io import write_json_atomic

    train, val, vocab, model = _setup(tiny_data)
    one_epoch = dataclasses.replace(TRAIN, epochs=1)
    result = _fit(model, vocab, train, val, one_epoch, Recorder(), scenes=False)
    assert "grounded" not in result.best and "grounded" in _fit(model, vocab, train, val, one_epoch, Recorder()).best
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in result.best.values())
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "m.json", {"val_grounded": math.nan})
    assert not (tmp_path / "m.json").exists()
    write_json_atomic(tmp_path / "m.json", result.best)
    assert json.loads((tmp_path / "m.json").read_text()) == result.best


def test_adam_is_fused_on_cpu_with_the_loops_update():
    from captioning.optim import adam

    torch.manual_seed(0)
    fused_net = torch.nn.Linear(8, 4)
    loop_net, start = copy.deepcopy(fused_net), copy.deepcopy(fused_net)
    fused = adam(fused_net.parameters(), 0.01, torch.device("cpu"))
    loop = torch.optim.Adam(loop_net.parameters(), lr=0.01, foreach=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(5):
        x = torch.randn(16, 8)
        for net, optimizer in ((fused_net, fused), (loop_net, loop)):
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
            optimizer.step()
    for a, b, before in zip(fused_net.parameters(), loop_net.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - before).abs().min() > 1e-3  # every weight moved: five real steps


def test_onecycle_warms_up_anneals_and_resumes_on_the_same_curve():
    from captioning.optim import adam, lr_schedule

    def curve(done: int, steps: int) -> list[tuple[float, float]]:
        optimizer = adam(torch.nn.Linear(2, 2).parameters(), 0.004, torch.device("cpu"))
        scheduler = lr_schedule(optimizer, "onecycle", 0.004, 40, done_steps=done)
        points = []
        for _ in range(steps):
            group = optimizer.param_groups[0]
            points.append((group["lr"], group["betas"][0]))
            optimizer.step()
            scheduler.step()
        return points

    straight = curve(0, 40)
    rates = [lr for lr, _ in straight]
    assert rates[0] == pytest.approx(0.004 / 25) and max(rates) == pytest.approx(0.004)
    assert rates.index(max(rates)) == 9 and rates[-1] < 1e-5  # peak after a quarter, then annealed
    assert curve(17, 23) == straight[17:]  # a resumed run continues exactly where it stopped
    optimizer = adam(torch.nn.Linear(2, 2).parameters(), 0.004, torch.device("cpu"))
    assert lr_schedule(optimizer, "constant", 0.004, 40) is None and optimizer.param_groups[0]["lr"] == 0.004
