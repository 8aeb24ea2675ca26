"""What is served is what was evaluated: the `caption` CLI and the logged MLflow model decode as
the decoding file that evaluate wrote says, with the same batched code, for both decoders."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
import torch

from captioning.checkpoint import save_checkpoint
from captioning.layout import read_split
from captioning.model import Captioner
from captioning.params import ModelParams
from captioning.predict import Decoding, caption_images, encode_image, main
from captioning.serving import log_pyfunc, model_name
from captioning.text import Vocabulary

SMALL = ModelParams(backbone="resnet18", image_size=32, embed_size=16, hidden_size=24, max_seq_len=9)
ATTENTION = ModelParams(backbone="resnet18", image_size=32, embed_size=16, hidden_size=24, max_seq_len=9,
                        decoder="attention", attention_size=8)  # a 2 x 2 grid of layer3
BEAM = Decoding(beam_size=3, length_penalty=0.5, bf16=False)
GREEDY = Decoding(beam_size=1, length_penalty=0.0, bf16=False)


@pytest.fixture(scope="module", params=[SMALL, ATTENTION], ids=["lstm", "attention"])
def trained(tiny_data, tmp_path_factory, request):
    """A checkpoint whose greedy and beam-3 captions differ, and the images that show it."""
    train = read_split(tiny_data, "train")
    vocab = Vocabulary.build([c for cs in train.captions.values() for c in cs], 1)
    images = [train.image_path(r) for r in train.images[:12]]
    cpu = torch.device("cpu")
    for seed in range(20):
        torch.manual_seed(seed)
        model = Captioner.build(request.param, len(vocab)).eval()
        with torch.no_grad():
            model.decoder.linear.weight *= 8  # sharper word choices: beam and greedy part ways
        greedy = caption_images(model, vocab, images, cpu, GREEDY, progress=False)
        beam = caption_images(model, vocab, images, cpu, BEAM, progress=False)
        if greedy != beam:
            break
    else:
        pytest.fail("no random model whose beam and greedy captions differ")
    folder = tmp_path_factory.mktemp("model")
    save_checkpoint(folder / "checkpoint.pt", model, vocab, {"seed": seed})
    return folder, images, {1: greedy, 3: beam}


def _cli(capsys, *args) -> list[str]:
    main([*map(str, args)])
    return [line.split("\t")[1] if "\t" in line else "" for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("decoding", [GREEDY, BEAM])
def test_cli_decodes_as_the_decoding_file_beside_the_checkpoint(trained, capsys, decoding):
    folder, images, expected = trained
    decoding.save(folder / "decoding.json")
    assert _cli(capsys, *images, "--checkpoint", folder / "checkpoint.pt") == expected[decoding.beam_size]


def test_cli_beam_size_overrides_the_file_and_is_checked(trained, capsys, tmp_path):
    folder, images, expected = trained
    GREEDY.save(tmp_path / "greedy.json")
    args = (*images, "--checkpoint", folder / "checkpoint.pt", "--decoding", tmp_path / "greedy.json")
    assert _cli(capsys, *args, "--beam-size", "3") == expected[3]
    with pytest.raises(SystemExit):
        main([*map(str, args), "--beam-size", "0"])
    assert "--beam-size must be >= 1" in capsys.readouterr().err


def test_cli_without_a_decoding_file_says_which_stage_writes_it(trained, tmp_path, capsys):
    folder, images, _ = trained
    (tmp_path / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
    with pytest.raises(SystemExit, match=r"decoding\.json: no decoding settings; run the evaluate stage"):
        main([str(images[0]), "--checkpoint", str(tmp_path / "checkpoint.pt")])


def test_cli_attention_figures_show_the_caption_word_by_word(trained, tmp_path, capsys):
    from PIL import Image

    folder, images, expected = trained
    BEAM.save(folder / "decoding.json")
    longest = sorted(range(len(images)), key=lambda i: -len(expected[3][i].split()))[:2]
    chosen, captions = [images[i] for i in longest], [expected[3][i] for i in longest]
    assert len(captions[1].split()) >= 2
    args = [*map(str, chosen), "--checkpoint", str(folder / "checkpoint.pt"), "--attention", str(tmp_path / "att")]
    if load_config(folder)["decoder"] == "attention":
        assert _cli(capsys, *args) == captions
        for image, caption in zip(chosen, captions):
            figure = Image.open(tmp_path / "att" / f"{image.stem}.attention.png")
            # one panel per word, and one for the <end> it stopped at (none if it ran out of steps)
            sizes = [(160 * min(n, 6), (160 + 16) * -(-n // 6)) for n in (len(caption.split()), len(caption.split()) + 1)]
            assert figure.size in sizes
    else:
        with pytest.raises(SystemExit, match="trained with model.decoder: lstm, which has no attention to show"):
            main(args)


def load_config(folder) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["config"]


@pytest.mark.parametrize("decoding", [GREEDY, BEAM])
def test_logged_model_captions_as_evaluate_did_and_holds_the_weights_once(trained, tmp_path, decoding):
    folder, images, expected = trained
    decoding.save(tmp_path / "decoding.json")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'store.db'}")
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment, run_name="beam1 exp"):
        info = log_pyfunc(folder / "checkpoint.pt", tmp_path / "decoding.json", images[0], model_name("beam1 exp"))
    assert info.name == "captioner-beam1-exp"
    served = mlflow.pyfunc.load_model(info.model_uri)
    frame = pd.DataFrame({"image": [encode_image(p) for p in images]})
    assert list(served.predict(frame)["caption"]) == expected[decoding.beam_size]
    files = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    weights = [p for p in files if p.stat().st_size > 100_000]
    size = (folder / "checkpoint.pt").stat().st_size
    assert [p.name for p in weights] == ["checkpoint.pt"] and weights[0].stat().st_size == size
    assert json.loads(next(p for p in files if p.name == "decoding.json").read_text())["beam_size"] == decoding.beam_size
