import pytest

from offbeat.config import ConfigError, ServiceConfig, load_run_config, mask_url, resolved_dump


def test_file_env_and_set_overrides_in_order(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nid = "a"\nmax_staleness = 1\n[bus]\nfetch_batch = 10\n')
    cfg = load_run_config(path, sets=["run.max_staleness=3"], environ={"OFFBEAT__BUS__FETCH_BATCH": "20"})
    assert cfg.run.id == "a"
    assert cfg.run.max_staleness == 3
    assert cfg.bus.fetch_batch == 20


def test_bad_value_names_field_and_value(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[run]\nmax_staleness = -1\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path, environ={})
    assert "run.max_staleness" in str(err.value) and "-1" in str(err.value)


def test_unknown_field_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"bus\.nats_ur"):
        load_run_config(None, sets=["bus.nats_ur=nats://x"], environ={})


def test_service_section_is_validated_by_its_own_model():
    class Section(ServiceConfig):
        workers: int = 1

    cfg = load_run_config(None, sets=["sandbox.workers=zero"], environ={})
    with pytest.raises(ConfigError, match=r"sandbox\.workers.*'zero'"):
        cfg.section("sandbox", Section)
    assert (
        load_run_config(None, sets=["sandbox.workers=4"], environ={}).section("sandbox", Section).workers == 4
    )


def test_an_unknown_section_is_refused_by_name(tmp_path):
    # a misspelt [trainr] was kept raw and never read: the run trained with the defaults
    path = tmp_path / "run.toml"
    path.write_text("[trainr]\nlr = 1e-5\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trainr\] \(did you mean \[trainer\]\?\)"):
        load_run_config(path, environ={})
    with pytest.raises(ConfigError, match=r"unknown section \[zzz\]; known: run, bus, ledger"):
        load_run_config(None, sets=["zzz.x=1"], environ={})


def test_bad_set_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"expected section\.field=value"):
        load_run_config(None, sets=["nonsense"], environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml", environ={})


def test_resolved_config_masks_credentials():
    cfg = load_run_config(None, sets=['ledger.database_url="postgresql+asyncpg://u:secret@h/db"'], environ={})
    assert "secret" not in str(resolved_dump(cfg))
    assert mask_url("nats://a:b@h:1") == "nats://a:***@h:1"


@pytest.mark.parametrize(
    ("url", "secret", "kept"),
    [
        ("nats://s3cr3t-token@nats:4222", "s3cr3t-token", "nats://***@nats:4222"),
        ("postgresql://:pw-only@db/x", "pw-only", "postgresql://:***@db/x"),
        ("postgresql+asyncpg://app@db/x?password=hunter2&sslmode=require", "hunter2", "sslmode=require"),
        ("postgresql://app@db/x?sslpassword=k3y", "k3y", "postgresql://***@db/x"),
        ("could not connect to nats://u:p4ss@h:1 (refused)", "p4ss", "(refused)"),
    ],
)
def test_mask_url_leaves_no_credential(url, secret, kept):
    masked = mask_url(url)
    assert secret not in masked
    assert kept in masked
