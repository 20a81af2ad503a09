"""config/default.toml holds every default; a user file is validated key by key."""

import signal

import pytest

from smpd import config
from smpd.machine import hotpath
from smpd.errors import BadInput, ConfigError


def test_defaults_load_and_name_every_schema_key():
    cfg = config.load()
    for section, keys in config.SCHEMA.items():
        assert set(cfg.raw[section]) == set(keys), section
    assert cfg.get("kick", "delay_us") * cfg.get("kick", "rounds") == 5000  # "Wait up to 5ms"


def test_user_file_overrides_a_subset(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[machine]\ncpus = 8\n[watch]\nstrategy = "adaptive"\n')
    cfg = config.load(f)
    assert cfg.get("machine", "cpus") == 8 and cfg.get("watch", "strategy") == "adaptive"
    assert cfg.get("memory", "text_pages") == config.load().get("memory", "text_pages")


@pytest.mark.parametrize("body, says", [
    ("[machine]\ncpuz = 8\n", "unknown key 'cpuz' in [machine]; known keys: cpus, name, seed"),
    ("[machin]\ncpus = 8\n", "unknown section [machin]"),
    ('[machine]\ncpus = "8"\n', "machine.cpus = '8' is invalid; expected an integer in 1..4096"),
    ("[machine]\ncpus = 0\n", "expected an integer in 1..4096"),
    ("[machine]\ncpus = true\n", "expected an integer"),
    ('[watch]\nstrategy = "fast"\n', "expected one of 'auto', 'spin', 'adaptive'"),
    ('[watch]\nhot_path = "asm"\n', "watch.hot_path = 'asm' is invalid; expected one of 'auto', 'c', 'python'"),
    ('[signals]\nnmi = "SIGKILL"\n', "SIGRTMIN+k"),
    ('[signals]\nnmi = "SIGUSR1"\nsmi = "SIGUSR1"\n', "must be distinct"),
    ("[machine\n", "not valid TOML"),
])
def test_bad_config_is_refused_naming_key_and_accepted_values(tmp_path, body, says):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert says in str(e.value) and str(f) in str(e.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_signal_names_map_to_numbers():
    assert config.parse_signal("SIGUSR2") == signal.SIGUSR2
    assert config.parse_signal("SIGRTMIN+3") == signal.SIGRTMIN + 3
    with pytest.raises(ValueError):
        config.parse_signal("SIGRTMIN+16")


def test_hot_path_c_without_the_compiled_module_is_a_clear_error(monkeypatch):
    """Where pip could not build smpd.machine._hotpath, asking for it says why and what is accepted;
    auto falls back to the Python loops and says so."""
    monkeypatch.setattr(hotpath, "_hotpath", None)
    monkeypatch.setattr(hotpath, "WHY_NOT", "the compiled module smpd.machine._hotpath is not built (test)")
    with pytest.raises(BadInput, match=r"hot path 'c' is unavailable: .*not built.*Accepted: auto, python"):
        hotpath.choose("c")
    assert hotpath.choose("auto") == ("python", "python (the compiled module smpd.machine._hotpath is not built (test))")
    assert hotpath.choose("python") == ("python", "python (asked for)")
