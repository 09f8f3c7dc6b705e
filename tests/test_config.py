from pathlib import Path

import pytest

from scaling_abs.config import TrainConfig, list_presets, load_config, parse_overrides, validate
from scaling_abs.errors import ConfigError


def test_defaults_validate_and_are_the_embedded_default():
    cfg = load_config()
    assert (cfg.strategy, cfg.model, cfg.dataset) == ("absa", "cnn", "fashion_mnist")
    assert cfg.resolved_adv_stop_epoch == cfg.epochs / 2


def test_overrides_are_typed():
    cfg = load_config(
        None, ["lr=0.1", "epochs=2", "lr_decay_epochs=[1, 1.5]", "progress=false", "strategy=bl"]
    )
    assert cfg.lr == 0.1 and cfg.epochs == 2.0 and cfg.lr_decay_epochs == [1.0, 1.5]
    assert cfg.progress is False and cfg.strategy == "bl"
    assert parse_overrides(["deepspeed="]) == {"deepspeed": ""}


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert cfg.epochs > 0 and cfg.lr > 0
    for strategy in ("bl", "fb", "gg", "abs", "absa"):
        load_config(preset, [f"strategy={strategy}"])


def test_paper_presets_follow_appendix_b():
    i3 = load_config("i3")
    assert (i3.model, i3.dataset, i3.epochs, i3.lr, i3.lr_decay, i3.lr_decay_epochs) == (
        "i3",
        "imagenet",
        90,
        0.1,
        0.1,
        [30.0, 60.0, 80.0],
    )
    s1 = load_config("s1")
    assert (s1.hessian_every, s1.lr, s1.lr_decay, s1.lr_decay_epochs) == (65536, 0.01, 0.2, [5.0, 10.0, 15.0])
    for p in ("s1", "c1", "i3"):
        cfg = load_config(p)
        assert (cfg.alpha, cfg.beta, cfg.kappa, cfg.adv_eps, cfg.adv_fraction, cfg.adv_decay) == (
            2,
            2,
            10,
            0.005,
            0.2,
            2,
        )


@pytest.mark.parametrize("preset", ["c1", "c2", "c3", "c4", "i1", "i2", "i3"])
def test_paper_presets_check_once_per_epoch(preset):
    # Section 4: the power iteration runs at the end of every epoch (SVHN alone: every 65536 samples).
    # Only the demo and the SVHN-like presets check more often than once an epoch; a preset must not
    # inherit the demo's 15000 samples: on ImageNet that would be 85 checks of 4096 images per epoch.
    assert load_config(preset).hessian_every == 0


def test_the_defaults_check_once_an_epoch_and_the_demo_four_times():
    # DESIGN: "every n training samples (default: once per epoch)". The demo preset is the embedded
    # default with more checks (8 epochs hold 8 checks at once an epoch, kappa needs 11 to grow).
    defaults, demo = load_config(), load_config("demo")
    assert defaults.hessian_every == 0 and demo.hessian_every == 15000
    differ = {k for k, v in demo.to_dict().items() if defaults.to_dict()[k] != v}
    assert differ == {"hessian_every", "output_dir"}


@pytest.mark.parametrize(
    "override, key",
    [
        ("nonsense=1", "nonsense"),
        ("lr=abc", "lr"),
        ("lr=.nan", "lr"),
        ("lr=-1", "lr"),
        ("epochs=0", "epochs"),
        ("batch_size=1.5", "batch_size"),
        ("max_batch_size=64", "max_batch_size"),
        ("beta=1", "beta"),
        ("alpha=0.5", "alpha"),
        ("adv_fraction=1.5", "adv_fraction"),
        ("adv_eps=-0.1", "adv_eps"),
        ("strategy=sgd", "strategy"),
        ("model=resnet1000", "model"),
        ("dataset=mnist3d", "dataset"),
        ("lr_scaling=cubic", "lr_scaling"),
        ("adv_decay_on=kappa", "adv_decay_on"),
        ("hessian_block=first:2", "hessian_block"),
        ("mixed_precision=fp8", "mixed_precision"),
        ("deepspeed=/no/such/ds.json", "deepspeed"),
        ("data_dir=/no/such/dir", "data_dir"),
        ("lr_decay_epochs=[3, 1]", "lr_decay_epochs"),
        ("progress=maybe", "progress"),
        ("lr_schedule=cosine", "lr_schedule"),
        ("hessian_reuse_graph=sometimes", "hessian_reuse_graph"),
        ("hessian_custom_rules=fast", "hessian_custom_rules"),
        ("hessian_micro_batch_size=-1", "hessian_micro_batch_size"),
        ("hessian_solver=arnoldi", "hessian_solver"),
        ("hessian_warm_start=perhaps", "hessian_warm_start"),
        ("hessian_precision=fp8", "hessian_precision"),
        ("hessian_precision=yes", "hessian_precision"),
        ("alpha=.inf", "alpha"),
        ("beta=inf", "beta"),
        ("warmup_epochs=.nan", "warmup_epochs"),
        ("adv_stop_epoch=nan", "adv_stop_epoch"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(None, [override])


def test_poly_schedule_settings():
    i2 = load_config("i2")  # Appendix B: 0.01 -> 1e-4 quadratically by epoch 60, then constant
    assert i2.resolved_lr_poly == (60.0, 2.0, pytest.approx(0.01))
    assert load_config(None, ["lr_schedule=poly"]).resolved_lr_poly == (8.0, 2.0, 0.0)  # to 0 at the end
    assert load_config(None).resolved_lr_poly is None
    assert load_config(None, ["hessian_reuse_graph=true"]).hessian_reuse_graph == "true"
    for bad, key in (
        (["lr_schedule=poly", "lr_final=1.0"], "lr_final"),
        (["lr_schedule=poly", "lr_poly_power=0"], "lr_poly_power"),
        (["hessian_checkpoint=true", "hessian_reuse_graph=true"], "hessian_checkpoint"),
        (["hessian_checkpoint=sometimes"], "hessian_checkpoint"),
    ):
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            load_config(None, bad)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"lr: [0.1\n", "not valid YAML"),
        (b"- 1\n- 2\n", "mapping"),
        ("lr: 0.1  # caf\xe9\n".encode("latin-1"), "UTF-8"),
        (b"1: 2\nlr: 0.1\n", "1 is not a key name"),
    ],
)
def test_config_files_that_hold_no_settings(tmp_path, content, match):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^config: .*{match}"):
        load_config(str(path))


def test_batch_must_divide_over_processes():
    cfg = TrainConfig(batch_size=96, max_batch_size=96 * 8)
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="batch_size"):
        validate(TrainConfig(batch_size=100, max_batch_size=800), world_size=3)


def test_every_key_is_in_the_readme_table():
    from scaling_abs.config import FIELDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [k for k in FIELDS if f"| `{k}` |" not in readme]
    assert not missing, f"README's config key table lacks {missing}"
    shown = {k: "(empty)" if v == "" else str(v) for k, v in TrainConfig().to_dict().items()}
    stale = [k for k in FIELDS if f"| `{k}` | `{shown[k]}` |" not in readme]
    assert not stale, f"README's config key table shows other defaults for {stale}"


def test_mixed_precision_no_from_the_command_line():
    # YAML 1.1 reads an unquoted `no` as False; the key must still mean "no mixed precision".
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(None, {"mixed_precision": False}).mixed_precision == "no"


def test_mixed_precision_no_in_a_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\nhessian_reuse_graph: true\noutput_dir: runs/x\n")
    cfg = load_config(str(path))
    assert (cfg.mixed_precision, cfg.hessian_reuse_graph) == ("no", "true")
    path.write_text("mixed_precision: bf16\nhessian_precision: no\n")
    cfg = load_config(str(path))
    assert (cfg.mixed_precision, cfg.hessian_precision) == ("bf16", "no")


def test_string_overrides_read_like_yaml_but_keep_numbers_as_typed():
    cfg = load_config(None, ["hessian_reuse_graph=False", "hessian_block='last:2'", "strategy= gg"])
    assert (cfg.hessian_reuse_graph, cfg.hessian_block, cfg.strategy) == ("false", "last:2", "gg")
    assert load_config(None, ["hessian_custom_rules=off"]).hessian_custom_rules == "false"
    cfg = load_config(None, ["resume=null", "output_dir=010", "mixed_precision=off"])
    assert (cfg.resume, cfg.output_dir, cfg.mixed_precision) == ("", "010", "no")
    with pytest.raises(ConfigError, match="mixed_precision.*'true'"):
        load_config(None, ["mixed_precision=yes"])


def test_numbers_in_scientific_notation(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; users write it that way on the command line and in files
    cfg = load_config(None, ["lr=1e-3", "weight_decay=5E-4", "batch_size=1e2", "lr_decay_epochs=[2e0, 3]"])
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size) == (1e-3, 5e-4, 100)
    assert cfg.lr_decay_epochs == [2.0, 3.0]
    path = tmp_path / "run.yaml"
    path.write_text("weight_decay: 5e-4\nhessian_tol: 1e-3\n")
    assert (load_config(str(path)).weight_decay, load_config(str(path)).hessian_tol) == (5e-4, 1e-3)
    with pytest.raises(ConfigError, match="^batch_size: expected an integer"):
        load_config(None, ["batch_size=1e-3"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("batch_size=.inf", "batch_size"),
        ("seed=.nan", "seed"),
        ("seed=-1", "seed"),
        (f"seed={2**64}", "seed"),
        ("hessian_block=last:\u00b2", "hessian_block"),  # a superscript 2: isdigit() says yes, int() no
    ],
)
def test_values_that_used_to_raise_deep_inside(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(None, [override])


def test_output_dir_must_be_a_folder_or_creatable(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for bad in (afile, afile / "sub"):
        with pytest.raises(ConfigError, match=r"^output_dir: .*afile is a file"):
            load_config(None, [f"output_dir={bad}"])
    assert load_config(None, [f"output_dir={tmp_path / 'new' / 'run'}"]).output_dir.endswith("run")


def test_config_paths_that_are_no_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="names no file"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(str(tmp_path))
    # a folder named like a preset in the working directory does not hide the preset
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c1").mkdir()
    assert load_config("c1").model == "c1"
