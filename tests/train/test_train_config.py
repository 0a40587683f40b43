"""TrainConfig: TOML round trip, overrides, and errors that name the key and the choices."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bnlab.train import ConfigError, TrainConfig, config_from_dict, load_config, to_toml
from bnlab.train.config import parse_value, set_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FULL = """
seed = 7
steps = 300
device = "cpu"

[data]
spec = "gaussian"
batch_size = 50
standardize = false
options = { n_samples = 400, input_dim = 6, output_dim = 2 }

[model]
name = "dln"
norm = "bn"
init_scale = 0.5
options = { depth = 5, width = 8 }

[optim]
name = "Adam"
lr = 0.001
options = { betas = [0.8, 0.99] }

[schedule]
name = "multistep"
milestones = [100, 200]
gamma = 0.5

[[probes]]
name = "gradient_path"
every = 50
options = { etas = [0.1, 0.2] }

[[probes]]
name = "internal_covariate_shift"
every = 100

[checkpoint]
every = 25
keep = 3
"""


def test_toml_to_dataclass_to_toml_is_the_identity(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FULL)
    config = load_config(path)
    assert config.model.options == {"depth": 5, "width": 8}
    assert config.probes[1].name == "internal_covariate_shift"
    assert config.optim.options["betas"] == [0.8, 0.99]
    text = to_toml(config)
    again = config_from_dict(tomllib.loads(text))
    assert again == config
    assert to_toml(again) == text
    # every value written is the one read, beyond the defaults
    assert tomllib.loads(text)["schedule"]["milestones"] == [100, 200]


def test_default_config_round_trips() -> None:
    config = TrainConfig()
    assert config_from_dict(tomllib.loads(to_toml(config))) == config


def test_overrides_parse_toml_values(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FULL)
    config = load_config(path, ["optim.lr=0.1", "model.options.depth=3", "model.norm=l1"])
    assert config.optim.lr == 0.1 and config.model.norm == "l1"
    assert config.model.options == {"depth": 3, "width": 8}
    assert parse_value("true") is True and parse_value("cuda") == "cuda"
    assert parse_value('"0.1"') == "0.1" and parse_value("1e-3") == 1e-3


def test_integers_are_accepted_where_floats_are_expected() -> None:
    assert config_from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        ({"optim": {"lrr": 0.1}}, "optim.lrr", "allowed keys: name, lr, momentum"),
        ({"stepz": 3}, "stepz", "allowed keys: seed, steps"),
        ({"optim": {"lr": -1}}, "optim.lr", "must be > 0"),
        ({"optim": {"lr": "fast"}}, "optim.lr", "expected a number"),
        ({"steps": 1.5}, "steps", "expected an integer"),
        ({"model": {"norm": "batchnorm"}}, "model.norm", "allowed values: none, bn, noisy_bn"),
        ({"model": {"name": "resnet"}}, "model.name", "allowed values: vgg"),
        ({"model": {"options": {"depth": 3}}}, "model.options.depth", "allowed: init"),
        ({"optim": {"name": "Sgd"}}, "optim.name", "allowed values: .*SGD"),
        ({"schedule": {"name": "linear"}}, "schedule.name", "allowed values: constant, step"),
        ({"data": {"spec": "svhn"}}, "data.spec", "known datasets: digits"),
        ({"data": {"standardize": 1}}, "data.standardize", "expected true or false"),
        ({"device": "tpu"}, "device", "allowed values: cpu, cuda"),
        ({"probes": [{"name": "hessian"}]}, r"probes\[0\].name", "allowed values: gradient_path"),
        (
            {"probes": [{"name": "gradient_path", "options": {"eta": 1}}]},
            r"probes\[0\].options.eta",
            "allowed: etas, lr",
        ),
        ({"schedule": {"warmup_steps": 600}}, "schedule.warmup_steps", r"must be < steps"),
        ({"data": 3}, "data", "expected a table"),
        ({"data": {"options": {"n": 5}}}, "data.options.n", "dataset 'digits'; allowed: none"),
        (
            {"data": {"spec": "gaussian", "options": {"dim": 5}}},
            "data.options.dim",
            "allowed: n_samples, input_dim",
        ),
        ({"optim": {"options": {"lr": 0.1}}}, "optim.options.lr", "allowed: dampening"),
        ({"optim": {"name": "Adam", "options": {"beta": 0.9}}}, "optim.options.beta", "betas"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(
    data: dict[str, object], key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: .*{message}") as info:
        config_from_dict(data)
    assert info.value.key == key.replace("\\", "")


def test_malformed_overrides_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(_write(tmp_path, ""), ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lr: is 0\.1, not a table"):
        set_key({"optim": {"lr": 0.1}}, "optim.lr.x", 1)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "steps = = 3"))
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.toml")


def _write(folder: Path, text: str) -> Path:
    path = folder / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["digits_bn.toml", "digits_sweep.toml"])
def test_the_example_configs_are_valid(name: str) -> None:
    from bnlab.train import load_sweep_config, run_names

    path = Path(__file__).parents[2] / "examples" / name
    config = load_sweep_config(path)
    assert config.base == load_config(path)
    assert len(run_names(config)) == (18 if "sweep" in name else 1)
