import pytest
import yaml

from captioning.params import Params, ParamsError, flatten, load_params, parse_params
from conftest import REPO


def test_params_yaml_spells_out_every_default_with_its_value():
    # Every knob is written in params.yaml, so DVC tracks it (a code default is invisible to DVC),
    # and with the dataclasses' value: a test, a benchmark or a preset built on the dataclasses
    # means what the pipeline runs.
    written = flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    defaults = flatten(Params().to_dict())
    assert set(written) == set(defaults)
    differ = {k: (written[k], defaults[k]) for k in written
              if written[k] != defaults[k] or type(written[k]) is not type(defaults[k])}
    assert not differ, f"params.yaml vs the params dataclasses: {differ}"
    assert load_params(REPO / "params.yaml") == Params()


def test_misspelt_key_is_named_with_a_suggestion():
    with pytest.raises(ParamsError, match=r"unknown key 'train\.lrr'; did you mean 'train\.lr'"):
        parse_params({"train": {"lrr": 0.1}})


def test_unknown_section_is_rejected():
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        parse_params({"trian": {}})


@pytest.mark.parametrize("raw, message", [
    ({"train": {"lr": -1}}, r"train\.lr must be > 0"),
    ({"train": {"batch_size": 0}}, r"train\.batch_size must be >= 1"),
    ({"train": {"epochs": "5"}}, r"train\.epochs must be an integer"),
    ({"vocab": {"threshold": 0}}, r"vocab\.threshold must be >= 1"),
    ({"model": {"backbone": "vgg16"}}, r"model\.backbone must be one of resnet18, .*resnet152"),
    ({"model": {"pretrained": "yes"}}, r"model\.pretrained must be true or false"),
    ({"data": {"source": "imagenet"}}, r"data\.source must be one of synthetic"),
    ({"train": {"select_metric": "accuracy"}}, r"train\.select_metric must be one of"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"evaluate": {"beam_size": 0}}, r"evaluate\.beam_size must be >= 1, got 0"),
    ({"evaluate": {"length_penalty": -0.5}}, r"evaluate\.length_penalty must be between 0 and 2"),
    ({"evaluate": {"length_penalty": float("nan")}}, r"evaluate\.length_penalty must be between 0 and 2"),
    ({"model": {"decoder": "transformer"}}, r"model\.decoder must be one of lstm, attention"),
    ({"model": {"grid_layer": "layer2"}}, r"model\.grid_layer must be one of layer3, layer4"),
    ({"model": {"decoder": "attention", "num_layers": 2}}, r"model\.num_layers is 2, but the attention decoder is one"),
    ({"train": {"attention_reg": -1}}, r"train\.attention_reg must be >= 0"),
    ({"train": {"select_metric": "last", "patience": 3}}, r"train\.patience is 3, but train\.select_metric last"),
])
def test_bad_values_name_the_key_and_what_is_allowed(raw, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"model": {"hiden_size": 3}}))
    with pytest.raises(ParamsError, match=r"params\.yaml: unknown key 'model\.hiden_size'; did you mean 'model\.hidden_size'"):
        load_params(path)


def test_int_is_accepted_where_a_float_is_expected():
    assert parse_params({"train": {"lr": 1}}).train.lr == 1.0


def test_a_rate_in_exponent_form_is_a_number(tmp_path):
    """`dvc exp run -S train.lr=0.000001` writes `1e-06`, which YAML 1.1 reads as a string."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-06\n  epochs: 2\n")
    assert load_params(path).train.lr == 1e-06
    with pytest.raises(ParamsError, match=r"train\.lr must be a number, got 'fast'"):
        parse_params({"train": {"lr": "fast"}})
    with pytest.raises(ParamsError, match=r"train\.epochs must be an integer, got '1e3'"):
        parse_params({"train": {"epochs": "1e3"}})
    for key in ("train.nodes", "evaluate.registered_model"):
        section, name = key.split(".")
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            parse_params({section: {name: 0 if name == "nodes" else "a name/with a slash"}})


def test_a_stage_reads_only_the_params_it_declares():
    from captioning.params import UndeclaredParamError

    params = load_params(REPO / "params.yaml", ("seed", "model.backbone", "compute"))
    assert params.model.backbone == "resnet18" and params.compute.device == "auto"
    with pytest.raises(UndeclaredParamError, match=r"model\.image_size is read but not declared"):
        params.model.image_size
    with pytest.raises(UndeclaredParamError, match=r"^train is read but not declared"):
        params.train
    assert params.to_dict() == {"seed": params.seed, "model": {"backbone": "resnet18"},
                                "compute": load_params(REPO / "params.yaml").to_dict()["compute"]}
