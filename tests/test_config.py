"""Config loading: defaults = quickstart preset, typed --set overrides, one-line UserErrors, fuzzing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpc as fpc
from fastpc.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    upgrade_stored_config,
    valid_keys,
)
from fastpc.rundir import save_config
from fastpc.presets import list_presets, preset_path


def test_defaults_are_the_quickstart_preset():
    assert load_config(preset_path("quickstart")) == Config()
    cfg = Config()
    assert (cfg.learner.name, cfg.model.arch, cfg.model.depth, cfg.data.name, cfg.train.epochs) == (
        "epc", "mlp", 4, "fashion-mnist", 1)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_is_valid(name):
    cfg = load_config(preset_path(name))
    assert cfg.learner.name in fpc.list_learners()


def test_required_keys_exist():
    keys = set(valid_keys())
    required = """data.name data.root data.batch_size model.arch model.widths model.depth model.width
    model.name model.act learner.name learner.loss learner.iters learner.state_lr learner.init optim.name
    optim.lr optim.weight_decay optim.schedule train.epochs train.seed train.device train.out""".split()
    assert set(required) <= keys


def test_every_field_is_documented():
    import ast
    import inspect

    import fastpc.config_schema as mod  # where the sections are defined (fastpc.config re-exports)

    tree = ast.parse(inspect.getsource(mod))
    sections = [n for n in tree.body
                if isinstance(n, ast.ClassDef) and n.name.endswith("Config") and n.name != "Config"]
    # Every section of Config is checked, so the test cannot pass by parsing the wrong module.
    assert {n.name for n in sections} == {type(getattr(Config(), f.name)).__name__
                                          for f in dataclasses.fields(Config)}
    checked = 0
    for node in sections:
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and \
                    isinstance(nxt.value.value, str), f"{node.name}.{stmt.target.id} has no docstring"
                checked += 1
    assert checked == len(valid_keys())  # one documented field per dotted key


def test_overrides_are_yaml_typed():
    cfg = load_config(None, ["learner.state_lr=0.3", "optim.lr=1e-3", "model.widths=[32, 16]",
                             "data.root=null", "learner.safeguard=true", "train.max_energy=1e6",
                             "learner.iters=10"])
    assert cfg.learner.state_lr == 0.3 and isinstance(cfg.learner.state_lr, float)
    assert cfg.optim.lr == 1e-3  # YAML 1.1 reads "1e-3" as a string; numbers fields accept it
    assert cfg.model.widths == [32, 16]
    assert cfg.data.root is None and cfg.learner.safeguard is True
    assert cfg.learner.iters == 10 and isinstance(cfg.learner.iters, int)
    assert cfg.train.max_energy == 1e6


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner: {name: spc, iters: 7}\noptim: {lr: 0.01}\n")
    cfg = load_config(p, ["learner.iters=9"])
    assert (cfg.learner.name, cfg.learner.iters, cfg.optim.lr) == ("spc", 9, 0.01)
    assert cfg.model == Config().model  # untouched sections keep the defaults


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["model.arch=vgg", "model.name=vgg5", "optim.schedule=warmup_cosine",
                             "optim.warmup=0.1", "data.root=/data"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(cfg)


def test_learner_options_only_what_the_learner_accepts():
    assert set(load_config(None, ["learner.name=bp"]).learner.options()) == {"loss", "init", "init_options"}
    opts = load_config(None, ["learner.name=spc", "learner.incremental=true"]).learner.options()
    assert opts["incremental"] is True and "rescale" not in opts
    assert "incremental" not in Config().learner.options()


@pytest.mark.parametrize("item, expected", [
    ("learner.stat_lr=1", "did you mean 'learner.state_lr'"),
    ("lerner.iters=3", "did you mean 'learner.iters'"),
    ("optim.weightdecay=0.1", "did you mean 'optim.weight_decay'"),
    ("learner.iters=abc", "learner.iters: expected an integer"),
    ("learner.iters=-1", "learner.iters: must be >= 0"),
    ("learner.iters=2.5", "learner.iters: expected an integer"),
    ("learner.iters=true", "learner.iters: expected an integer"),
    ("learner.state_lr=0", "learner.state_lr: must be > 0"),
    ("learner.state_lr=.nan", "learner.state_lr: expected a finite number"),
    ("data.batch_size=0", "data.batch_size: must be >= 1"),
    ("data.val_split=1.5", "data.val_split: must be in [0, 1)"),
    ("train.download=1", "unknown config key 'train.download'"),
    ("learner.name=epcc", "did you mean 'epc'"),
    ("data.name=fashion-mnst", "did you mean 'fashion-mnist'"),
    ("model.arch=transformer", "model.arch: unknown value 'transformer'"),
    ("model.arch=vgg", "model.name: is required"),
    ("optim.nesterov=true", "optim.nesterov"),
    ("optim.warmup=0.1", "optim.warmup: is only used by schedule warmup_cosine"),
    ("train.device=gpu", "train.device"),
    ("model.widths=[0]", "model.widths"),
    ("model.widths=5", "model.widths: expected a list"),
    ("learner.iters", "--set expects key=value"),
    ("learner.iters=[1, 2", "cannot read value"),
])
def test_bad_input_is_one_clear_user_error(item, expected):
    with pytest.raises(fpc.UserError) as e:
        load_config(None, [item])
    msg = str(e.value)
    assert expected in msg and "\n" not in msg


def test_bad_files(tmp_path):
    with pytest.raises(fpc.UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("learner: {name: epc\n")
    with pytest.raises(fpc.UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(fpc.UserError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "sect.yaml").write_text("learnr: {iters: 3}\n")
    with pytest.raises(fpc.UserError, match="did you mean 'learner'"):
        load_config(tmp_path / "sect.yaml")
    (tmp_path / "scalar.yaml").write_text("learner: 3\n")
    with pytest.raises(fpc.UserError, match="must be a mapping"):
        load_config(tmp_path / "scalar.yaml", ["learner.iters=2"])


# ---- fuzzing: any input gives a Config or a UserError, never another exception ----------------
_SECTION_KEYS = {s: [f.name for f in dataclasses.fields(type(getattr(Config(), s)))]
                 for s in ("data", "model", "learner", "optim", "train")}
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["epc", "bp", "spc", "mlp", "vgg", "vgg5", "resnet18", "none",
                                           "cosine", "warmup_cosine", "sgd", "adam", "ce", "mse", "cpu",
                                           "auto", "gelu", "forward", "fashion-mnist", "cifar10", "float64"]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=4), st.dictionaries(st.text(max_size=5), _scalars, max_size=3))
_keys = st.one_of(st.sampled_from(sorted({k for ks in _SECTION_KEYS.values() for k in ks})), st.text(max_size=8))
_sections = st.dictionaries(_keys, _values, max_size=6)
_configs = st.one_of(
    st.dictionaries(st.sampled_from(list(_SECTION_KEYS) + ["extra"]), st.one_of(_sections, _scalars), max_size=5),
    _values,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs)
def test_fuzz_config_from_dict(d):
    try:
        cfg = config_from_dict(d)
    except fpc.UserError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(cfg, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg  # a valid config survives a round trip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(valid_keys()), st.text(max_size=10)),
    st.text(max_size=20)), max_size=4))
def test_fuzz_set_overrides(items):
    try:
        cfg = config_from_dict(apply_overrides({}, items))
    except fpc.UserError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(cfg, Config)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_yaml_text(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    p.write_text(text)
    try:
        assert isinstance(load_config(p), Config)
    except fpc.UserError as e:
        assert "\n" not in str(e)


def test_init_options_reach_the_initializer():
    cfg = load_config(None, ["learner.init=normal", "learner.init_options={std: 0.5, mean: 1}"])
    assert cfg.learner.options()["init_options"] == {"std": 0.5, "mean": 1}
    torch.manual_seed(0)
    opts = {k: v for k, v in cfg.learner.options().items() if k != "compile"}  # fit resolves "auto"
    lrn = fpc.make_learner(cfg.learner.name, fpc.mlp([4, 5, 2]), **opts)
    assert (lrn.init.mean, lrn.init.std) == (1.0, 0.5)
    with pytest.raises(fpc.UserError, match=r"learner.init_options: state init 'normal' has no option\(s\) \['beta'\]"):
        load_config(None, ["learner.init=normal", "learner.init_options={beta: 1}"])
    with pytest.raises(fpc.UserError, match="learner.init_options: expected a mapping"):
        load_config(None, ["learner.init_options=3"])


def test_weight_init_and_state_init_have_their_own_names(tmp_path):
    cfg = load_config(None, ["model.weight_init=gaussian", "learner.init=zeros"])
    assert (cfg.model.weight_init, cfg.learner.init) == ("gaussian", "zeros")
    old = "'model.init' is now 'model.weight_init'"
    with pytest.raises(fpc.UserError, match=old):
        load_config(None, ["model.init=gaussian"])
    p = tmp_path / "old.yaml"
    p.write_text("model: {arch: mlp, init: gaussian}\n")
    with pytest.raises(fpc.UserError, match=old) as e:
        load_config(p)
    assert "\n" not in str(e.value)
    # a config fastpc stored before the rename (a run's config.yaml, a checkpoint's) still reads
    assert load_config(p, stored=True).model.weight_init == "gaussian"
    assert config_from_dict(upgrade_stored_config({"model": {"init": "gaussian"}})).model.weight_init == "gaussian"
    assert upgrade_stored_config({"model": {"init": "gaussian"}}) == {"model": {"weight_init": "gaussian"}}
