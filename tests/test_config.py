"""The checkpointing config section, the YAML loader and config/base_config.yaml."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest
import torch

from syncckpt.config import CheckpointingConfig, load_config, resolve_config_path, validate_config
from syncckpt.errors import ConfigError, SyncCkptError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_hallucination.py"


@pytest.fixture(scope="module")
def script():
    """The training script as a module: the full-file schema (TrainConfig) lives there, not in the library."""
    spec = importlib.util.spec_from_file_location("train_hallucination_for_config_tests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' postponed annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def one_line_error(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ---- base_config.yaml ----------------------------------------------------------------------------------------


def test_base_config_loads_by_bare_name_with_the_seed_checkpointing_section(script, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the bare name must also resolve from the repository, not only from the cwd
    cfg = load_config("base_config", script.TrainConfig, search_dirs=[REPO])
    ck = cfg.checkpointing
    assert (ck.save_dir, ck.save_strategy, ck.metric_for_best, ck.mode) == (
        "./checkpoints",
        "best",
        "val_f1_macro",
        "max",
    )
    assert (ck.save_total_limit, ck.save_every_n_epochs, ck.save_every_n_batches) == (3, 1, 500)
    assert (ck.save_every_n_minutes, ck.keep_last, ck.remote, ck.storage_options, ck.on_upload_error) == (
        None,
        1,
        None,
        {},
        "warn",
    )
    assert cfg.model.name is None and cfg.model.num_labels == 3
    assert cfg.training.mixed_precision == "no"


def test_base_config_checkpointing_section_validates_on_its_own():
    import yaml

    raw = yaml.safe_load((REPO / "config" / "base_config.yaml").read_text())
    assert set(raw) == {"model", "training", "data", "checkpointing"}
    assert CheckpointingConfig.model_validate(raw["checkpointing"]) == CheckpointingConfig()


def test_manager_kwargs_are_accepted_by_checkpoint_manager():
    from syncckpt.manager import CheckpointManager

    kwargs = CheckpointingConfig(save_every_n_minutes=20, remote="s3://b/run", keep_last=2).manager_kwargs()
    inspect.signature(CheckpointManager).bind(**kwargs)  # raises TypeError on a renamed or unknown argument
    assert kwargs["save_every_n_steps"] == 500 and kwargs["keep_epochs"] == 3 and kwargs["keep_last"] == 2


def test_null_save_every_n_batches_disables_step_checkpoints(tmp_path):
    from syncckpt.manager import CheckpointManager

    cfg = validate_config({"save_every_n_batches": None, "save_dir": str(tmp_path / "ck")}, CheckpointingConfig)
    kwargs = cfg.manager_kwargs()
    assert kwargs["save_every_n_steps"] is None
    model = torch.nn.Linear(2, 2)
    mgr = CheckpointManager(**kwargs)
    try:
        mgr.register(model=model)
        assert not any(mgr.step(step, epoch=0, batch_idx=step - 1) for step in range(1, 1001))
        mgr.wait()
        assert mgr.list_local() == []
    finally:
        mgr.close()


def test_save_strategy_epoch_means_no_best_model():
    assert CheckpointingConfig(save_strategy="epoch").manager_kwargs()["metric_for_best"] is None
    assert CheckpointingConfig(save_strategy="epoch", metric_for_best=None).manager_kwargs()["metric_for_best"] is None


@pytest.mark.parametrize(
    "yaml_value, manager_value",
    [
        ('"auto"', "auto"),
        ("off", "off"),  # YAML 1.1 reads a bare off as false: it means "off"
        ("null", "off"),
        ("11h30m", "11h30m"),
        ("2025-06-01T18:00", datetime(2025, 6, 1, 18, 0)),  # a string to YAML (no seconds): local time
        ("2025-06-01 18:00:00", datetime(2025, 6, 1, 18, 0)),  # a YAML timestamp
    ],
)
def test_the_deadline_key_takes_what_the_manager_takes(script, tmp_path, yaml_value, manager_value):
    from syncckpt.manager import CheckpointManager

    cfg = load_config(write(tmp_path, f"checkpointing: {{deadline: {yaml_value}}}\n"), script.TrainConfig)
    kwargs = cfg.checkpointing.manager_kwargs()
    assert kwargs["deadline"] == manager_value
    inspect.signature(CheckpointManager).bind(**kwargs)


@pytest.mark.parametrize("yaml_value", ["11 hours", "tomorrow", "3600"])
def test_a_bad_deadline_names_the_key_and_what_is_expected(script, tmp_path, yaml_value):
    path = write(tmp_path, f"checkpointing: {{deadline: {yaml_value}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, script.TrainConfig)
    message = one_line_error(err)
    assert message.startswith(f"{path}: checkpointing.deadline: expected 'auto', 'off', a duration"), message
    assert yaml_value in message


@pytest.mark.parametrize(
    ("yaml_value", "says"), [("bucket/run", "has no scheme"), ("s3:/bucket/run", "did you mean 's3://bucket/run'?")]
)
def test_a_remote_that_cannot_be_a_mirror_names_the_key_and_the_file(script, tmp_path, monkeypatch, yaml_value, says):
    """It used to pass the config and fail later, at the manager, without the file or the key."""
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, f"checkpointing: {{remote: '{yaml_value}'}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, script.TrainConfig)
    message = one_line_error(err)
    assert message.startswith(f"{path}: checkpointing.remote: ") and says in message, message


# ---- errors name the key path and the file -------------------------------------------------------------------


def test_unknown_key_names_key_path_and_file(script, tmp_path):
    path = write(
        tmp_path,
        """
        checkpointing:
          save_every_n_batchs: 250
    """,
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, script.TrainConfig)
    message = one_line_error(excinfo)
    assert str(path) in message
    assert "checkpointing.save_every_n_batchs: unknown key" in message
    assert "save_every_n_batches" in message  # the suggestion


def test_unknown_section_lists_the_allowed_ones(script, tmp_path):
    path = write(tmp_path, "chekpointing: {}\nzzz: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, script.TrainConfig)
    message = one_line_error(excinfo)
    assert "chekpointing: unknown key (did you mean 'checkpointing'?)" in message
    assert "(and 1 more problem)" in message


def test_unknown_key_without_a_close_match_lists_allowed_keys():
    allowed = r"x.yaml: frobnicate: unknown key \(allowed: deadline, keep_last, keep_local, metric_for_best"
    with pytest.raises(ConfigError, match=allowed):
        validate_config({"frobnicate": 1}, CheckpointingConfig, source="x.yaml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"500"', "expected an integer or null, got '500' (str)"),
        ("1.5", "expected an integer or null, got 1.5 (float)"),
        ("true", "expected an integer or null, got True (bool)"),
        ("0", "greater than or equal to 1"),
    ],
)
def test_wrong_type_names_key_path(script, tmp_path, value, expected):
    path = write(tmp_path, f"checkpointing:\n  save_every_n_batches: {value}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, script.TrainConfig)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: checkpointing.save_every_n_batches: "), message
    assert expected in message


def test_literal_and_dependent_errors_name_their_keys():
    with pytest.raises(ConfigError, match=r"^c.yaml: mode: expected one of 'max', 'min', got 'maximum' \(str\)$"):
        validate_config({"mode": "maximum"}, CheckpointingConfig, source="c.yaml")
    with pytest.raises(ConfigError, match=r"^c.yaml: metric_for_best: required when save_strategy is \"best\""):
        validate_config({"metric_for_best": None}, CheckpointingConfig, source="c.yaml")
    with pytest.raises(ConfigError, match=r"storage_options: expected a mapping"):
        validate_config({"storage_options": ["key"]}, CheckpointingConfig, source="c.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as excinfo:
        load_config(tmp_path / "nope.yaml", CheckpointingConfig)
    assert str(tmp_path / "nope.yaml") in one_line_error(excinfo)
    with pytest.raises(ConfigError, match=r"config file not found: no_such_name \(looked for no_such_name.yaml in "):
        resolve_config_path("no_such_name", search_dirs=[tmp_path])


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "checkpointing:\n  save_dir: [unclosed\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, CheckpointingConfig)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: invalid YAML at line ")


def test_duplicate_keys_are_refused(tmp_path):
    # PyYAML would silently keep the last one.
    path = write(tmp_path, "checkpointing:\n  keep_last: 1\n  remote: null\n  keep_last: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, CheckpointingConfig)
    assert one_line_error(excinfo) == f"{path}: invalid YAML at line 4, column 3: duplicate key 'keep_last'"


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level, got list"):
        load_config(write(tmp_path, "- a\n- b\n"), CheckpointingConfig)


def test_config_error_is_catchable_as_library_and_value_error(tmp_path):
    with pytest.raises(SyncCkptError):
        load_config(tmp_path / "nope.yaml", CheckpointingConfig)
    with pytest.raises(ValueError):
        load_config(tmp_path / "nope.yaml", CheckpointingConfig)


# ---- loading details -----------------------------------------------------------------------------------------


def test_bare_name_prefers_the_cwd_copy(script, tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "checkpointing:\n  keep_last: 4\n", name="base_config.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_config("base_config", script.TrainConfig, search_dirs=[REPO]).checkpointing.keep_last == 4
    assert resolve_config_path("base_config.yaml", search_dirs=[REPO]) == tmp_path / "config" / "base_config.yaml"


def test_exponent_floats_without_a_dot_are_floats(script, tmp_path):
    # PyYAML alone reads 2e-5 as a string; people write learning rates that way.
    cfg = load_config(write(tmp_path, "training:\n  learning_rate: 2e-5\n  mixed_precision: no\n"), script.TrainConfig)
    assert cfg.training.learning_rate == pytest.approx(2e-5)
    assert cfg.training.mixed_precision == "no"  # a bare YAML `no` is false; it still means "no"


def test_overrides_use_dotted_paths_and_skip_none(script, tmp_path):
    path = write(tmp_path, "checkpointing:\n  save_every_n_batches: 500\n")
    cfg = load_config(
        path,
        script.TrainConfig,
        overrides={"checkpointing.save_every_n_batches": 2, "checkpointing.remote": None, "training.epochs": 7},
    )
    assert cfg.checkpointing.save_every_n_batches == 2 and cfg.checkpointing.remote is None
    assert cfg.training.epochs == 7
    with pytest.raises(ConfigError, match=r"checkpointing.save_every_n_batches: expected an integer or null"):
        load_config(path, script.TrainConfig, overrides={"checkpointing.save_every_n_batches": "x"})


def test_override_into_a_non_section_is_an_error(tmp_path):
    path = write(tmp_path, "checkpointing: 5\n")
    with pytest.raises(ConfigError, match=r"checkpointing: expected a section \(mapping\), got 5"):
        load_config(path, CheckpointingConfig, overrides={"checkpointing.remote": "s3://b/r"})


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), CheckpointingConfig) == CheckpointingConfig()


def test_the_readme_from_your_own_code_block_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    """The Configuration section's block, run in a copy of the repository's config folder (it used to fail with
    a NameError: CheckpointManager was never imported)."""
    import re
    import shutil

    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"From your own code:\n\n```python\n(.*?)^```", section, re.S | re.M).group(1)
    shutil.copytree(root / "config", tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme"}
    exec(compile(block, "README.md Configuration block", "exec", dont_inherit=True), scope)
    try:
        assert scope["mgr"].directory == Path("./checkpoints") and scope["cfg"].save_every_n_batches == 500
    finally:
        scope["mgr"].close()
