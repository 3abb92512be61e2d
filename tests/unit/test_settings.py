"""Settings resolution: flag > FEDQ_* environment > TOML [job] table > default."""

from __future__ import annotations

import argparse

import pytest

from fedq.common.cli import SUBCOMMANDS, main
from fedq.common.settings import (
    CONNECTION_OPTIONS,
    DEFAULT_AMQP_URL,
    DEFAULT_REDIS_URL,
    Option,
    SettingsError,
    add_options,
    non_negative_float,
    non_negative_int,
    parse_bool,
    positive_float,
    positive_int,
    resolve,
)

OPTIONS = CONNECTION_OPTIONS + [
    Option("buffer_size", positive_int, 3, "updates per step"),
    Option("mixing_rate", positive_float, 0.6, "alpha"),
    Option("example_weighted", parse_bool, False, "weight by examples"),
    Option("algorithm", str, "fedasync", "aggregation", choices=("fedasync", "fedbuff", "fedavg")),
]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, OPTIONS)
    return parser.parse_args(list(argv))


def job_file(tmp_path, text: str, name: str = "job.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_when_nothing_but_job_is_given():
    values = resolve(parse("--job", "demo"), OPTIONS, environ={})
    assert values == {
        "job": "demo",
        "amqp_url": DEFAULT_AMQP_URL,
        "redis_url": DEFAULT_REDIS_URL,
        "buffer_size": 3,
        "mixing_rate": 0.6,
        "example_weighted": False,
        "algorithm": "fedasync",
        "management_url": None,
    }


@pytest.mark.parametrize(
    "sources, expected",
    [
        (("flag", "env", "file"), 11),
        (("flag", "env"), 11),
        (("flag", "file"), 11),
        (("flag",), 11),
        (("env", "file"), 22),
        (("env",), 22),
        (("file",), 33),
        ((), 3),
    ],
)
def test_precedence(tmp_path, sources, expected):
    argv = ["--job", "demo"]
    environ = {}
    if "flag" in sources:
        argv += ["--buffer-size", "11"]
    if "env" in sources:
        environ["FEDQ_BUFFER_SIZE"] = "22"
    if "file" in sources:
        argv += ["--config", job_file(tmp_path, "[job]\nbuffer_size = 33\n")]
    assert resolve(parse(*argv), OPTIONS, environ=environ)["buffer_size"] == expected


def test_each_option_comes_from_its_own_highest_source(tmp_path):
    config = job_file(
        tmp_path, '[job]\njob = "from-file"\nbuffer_size = 33\nmixing_rate = 0.25\namqp_url = "amqp://file/"\n'
    )
    values = resolve(
        parse("--config", config, "--mixing-rate", "0.5"),
        OPTIONS,
        environ={"FEDQ_BUFFER_SIZE": "22", "FEDQ_AMQP_URL": "amqp://env/"},
    )
    assert values["job"] == "from-file"  # only in the file
    assert values["buffer_size"] == 22  # env beats file
    assert values["mixing_rate"] == 0.5  # flag beats file
    assert values["amqp_url"] == "amqp://env/"  # env beats file
    assert values["redis_url"] == DEFAULT_REDIS_URL


def test_config_path_from_environment(tmp_path):
    config = job_file(tmp_path, '[job]\njob = "envjob"\nalgorithm = "fedbuff"\n')
    values = resolve(parse(), OPTIONS, environ={"FEDQ_CONFIG": config})
    assert values["job"] == "envjob" and values["algorithm"] == "fedbuff"


def test_config_flag_beats_config_environment(tmp_path):
    flagged = job_file(tmp_path, '[job]\njob = "flagged"\n', "a.toml")
    environment = job_file(tmp_path, '[job]\njob = "environment"\n', "b.toml")
    assert resolve(parse("--config", flagged), OPTIONS, environ={"FEDQ_CONFIG": environment})["job"] == "flagged"


def test_file_without_job_table_uses_top_level_keys(tmp_path):
    # (a top-level ``job = "name"`` would be taken for the [job] table itself: see the next test)
    config = job_file(tmp_path, 'buffer_size = 5\nalgorithm = "fedavg"\n')
    values = resolve(parse("--job", "j", "--config", config), OPTIONS, environ={})
    assert values["buffer_size"] == 5 and values["algorithm"] == "fedavg"


def test_bool_option_from_each_source(tmp_path):
    assert resolve(parse("--job", "j", "--example-weighted"), OPTIONS, environ={})["example_weighted"] is True
    assert (
        resolve(parse("--job", "j", "--example-weighted", "no"), OPTIONS, environ={"FEDQ_EXAMPLE_WEIGHTED": "yes"})[
            "example_weighted"
        ]
        is False
    )
    assert resolve(parse("--job", "j"), OPTIONS, environ={"FEDQ_EXAMPLE_WEIGHTED": "on"})["example_weighted"] is True
    config = job_file(tmp_path, "[job]\nexample_weighted = true\n")
    assert resolve(parse("--job", "j", "--config", config), OPTIONS, environ={})["example_weighted"] is True


def test_unrelated_environment_is_ignored():
    values = resolve(parse("--job", "j"), OPTIONS, environ={"BUFFER_SIZE": "9", "FEDQ_UNKNOWN": "1"})
    assert values["buffer_size"] == 3


# -- one job file for every command ---------------------------------------------------

# Two commands' settings, as fedq.common.cli.settings_by_command gives the real ones.
COMMANDS = {
    "coordinator": frozenset({"job", "amqp_url", "buffer_size", "algorithm", "mixing_rate"}),
    "status": frozenset({"job", "amqp_url"}),
}
STATUS_OPTIONS = [option for option in OPTIONS if option.name in COMMANDS["status"]]
JOB_FILE = """
[job]
job = "shared"
amqp_url = "amqp://shared/"
buffer_size = 5

[coordinator]
algorithm = "fedbuff"
amqp_url = "amqp://coordinator-only/"

[status]
amqp_url = "amqp://status-only/"
"""


def parse_as(command: str, options: list[Option], *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"fedq {command}")
    add_options(parser, options)
    return parser.parse_args(list(argv))


def test_each_command_reads_the_shared_table_and_its_own(tmp_path):
    config = job_file(tmp_path, JOB_FILE)
    coordinator = resolve(
        parse_as("coordinator", OPTIONS, "--config", config), OPTIONS, environ={}, commands=lambda: COMMANDS
    )
    assert (coordinator["job"], coordinator["amqp_url"], coordinator["buffer_size"], coordinator["algorithm"]) == (
        "shared",
        "amqp://coordinator-only/",
        5,
        "fedbuff",
    )
    # status leaves buffer_size and the [coordinator] table to the coordinator.
    status = resolve(
        parse_as("status", STATUS_OPTIONS, "--config", config), STATUS_OPTIONS, environ={}, commands=lambda: COMMANDS
    )
    assert status == {"job": "shared", "amqp_url": "amqp://status-only/"}


def test_a_key_no_command_reads_is_refused_with_the_nearest_name(tmp_path):
    config = job_file(tmp_path, '[job]\njob = "j"\nbufer_size = 4\n')
    with pytest.raises(SettingsError, match=r"no fedq command reads bufer_size \(did you mean buffer_size\?\)"):
        resolve(
            parse_as("status", STATUS_OPTIONS, "--config", config),
            STATUS_OPTIONS,
            environ={},
            commands=lambda: COMMANDS,
        )


def test_a_command_table_holds_only_that_commands_settings(tmp_path):
    config = job_file(tmp_path, '[job]\njob = "j"\n[status]\nbuffer_size = 4\n')
    with pytest.raises(SettingsError, match="fedq status does not read buffer_size"):
        resolve(
            parse_as("status", STATUS_OPTIONS, "--config", config),
            STATUS_OPTIONS,
            environ={},
            commands=lambda: COMMANDS,
        )


def test_a_dashed_key_is_answered_with_its_underscored_name(tmp_path):
    config = job_file(tmp_path, '[job]\njob = "j"\nbuffer-size = 4\n')
    with pytest.raises(SettingsError, match="write buffer_size for buffer-size"):
        resolve(parse_as("coordinator", OPTIONS, "--config", config), OPTIONS, environ={}, commands=lambda: COMMANDS)


def test_an_environment_variable_no_command_reads_is_named(capsys):
    environ = {"FEDQ_BUFER_SIZE": "4", "FEDQ_BUFFER_SIZE": "6", "FEDQ_CRASH_AT": "x:1", "FEDQ_TEST_AMQP_URL": "y"}
    values = resolve(
        parse_as("status", STATUS_OPTIONS, "--job", "j"), STATUS_OPTIONS, environ=environ, commands=lambda: COMMANDS
    )
    assert values["job"] == "j"
    warnings = capsys.readouterr().err.strip().splitlines()
    # FEDQ_BUFFER_SIZE is the coordinator's, FEDQ_CRASH_AT and FEDQ_TEST_* are not settings: not named.
    assert warnings == [
        "fedq: warning: the environment variable FEDQ_BUFER_SIZE is not a fedq setting and is "
        "ignored (did you mean FEDQ_BUFFER_SIZE?)"
    ]


def test_every_real_command_lists_its_settings():
    from fedq.common.cli import settings_by_command

    known = settings_by_command()
    assert set(known) == set(SUBCOMMANDS)
    assert {"buffer_size", "algorithm"} <= known["coordinator"] and "buffer_size" not in known["status"]
    assert {"job", "amqp_url", "redis_url"} <= known["worker"] and "partition" in known["worker"]


# -- errors --------------------------------------------------------------------------


def test_unknown_job_file_keys_are_rejected(tmp_path):
    config = job_file(tmp_path, '[job]\njob = "j"\nbufer_size = 4\nzeta = 1\n')
    with pytest.raises(SettingsError, match="reads bufer_size, zeta"):
        resolve(parse("--config", config), OPTIONS, environ={})


def test_missing_job_file(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        resolve(parse("--job", "j", "--config", str(tmp_path / "nope.toml")), OPTIONS, environ={})


def test_invalid_toml(tmp_path):
    with pytest.raises(SettingsError, match="not valid TOML"):
        resolve(parse("--job", "j", "--config", job_file(tmp_path, "[job\nx = ")), OPTIONS, environ={})


def test_top_level_settings_with_a_job_key(tmp_path):
    # Without a [job] table, a top-level ``job = "name"`` is just the job setting.
    values = resolve(parse("--config", job_file(tmp_path, 'job = "top"\nbuffer_size = 7\n')), OPTIONS, environ={})
    assert values["job"] == "top" and values["buffer_size"] == 7
    with pytest.raises(SettingsError, match="--job|job file key job"):
        resolve(parse("--config", job_file(tmp_path, "job = 5\n")), OPTIONS, environ={})


@pytest.mark.parametrize(
    "argv, environ, file_text, source",
    [
        (["--buffer-size", "0"], {}, None, "--buffer-size"),
        (["--buffer-size", "many"], {}, None, "--buffer-size"),
        ([], {"FEDQ_BUFFER_SIZE": "-2"}, None, "FEDQ_BUFFER_SIZE"),
        ([], {"FEDQ_MIXING_RATE": "fast"}, None, "FEDQ_MIXING_RATE"),
        ([], {"FEDQ_EXAMPLE_WEIGHTED": "maybe"}, None, "FEDQ_EXAMPLE_WEIGHTED"),
        ([], {}, "buffer_size = 0", "job file key buffer_size"),
        ([], {}, "mixing_rate = -0.5", "job file key mixing_rate"),
        ([], {}, 'example_weighted = "perhaps"', "job file key example_weighted"),
        ([], {"FEDQ_ALGORITHM": "fedsgd"}, None, "FEDQ_ALGORITHM"),
        ([], {}, 'algorithm = "fedprox"', "job file key algorithm"),
    ],
)
def test_bad_values_name_their_source(tmp_path, argv, environ, file_text, source):
    argv = ["--job", "j", *argv]
    if file_text is not None:
        argv += ["--config", job_file(tmp_path, f"[job]\n{file_text}\n")]
    with pytest.raises(SettingsError) as info:
        resolve(parse(*argv), OPTIONS, environ=environ)
    assert source in str(info.value)


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "x" * 65, "semi;colon", "ünïcode"])
def test_bad_job_names_are_rejected(name):
    with pytest.raises(SettingsError, match="--job"):
        resolve(parse(f"--job={name}"), OPTIONS, environ={})


def test_bad_job_name_from_environment_names_the_variable():
    with pytest.raises(SettingsError, match="FEDQ_JOB"):
        resolve(parse(), OPTIONS, environ={"FEDQ_JOB": "bad name"})


def test_missing_job_is_an_error():
    with pytest.raises(SettingsError, match="--job"):
        resolve(parse(), OPTIONS, environ={})


def test_missing_job_is_fine_when_the_option_list_has_no_job():
    options = [option for option in OPTIONS if option.name != "job"]
    parser = argparse.ArgumentParser()
    add_options(parser, options)
    assert resolve(parser.parse_args([]), options, environ={})["buffer_size"] == 3


def test_choices_outside_the_list_are_rejected_naming_the_flag():
    with pytest.raises(SettingsError, match="--algorithm='fedsgd' must be one of"):
        resolve(parse("--job", "j", "--algorithm", "fedsgd"), OPTIONS, environ={})


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


# -- small parsers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        (True, True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
        (False, False),
    ],
)
def test_parse_bool(text, expected):
    assert parse_bool(text) is expected


@pytest.mark.parametrize(
    "parser, good, bad",
    [
        (positive_int, [("1", 1), (7, 7)], ["0", "-1", "x", "1.5"]),
        (non_negative_int, [("0", 0), ("3", 3)], ["-1", "x"]),
        (positive_float, [("0.5", 0.5), (2, 2.0)], ["0", "-0.1", "nan", "x"]),
        (non_negative_float, [("0", 0.0), ("1e3", 1000.0)], ["-1e-9", "nan", "x"]),
    ],
)
def test_number_parsers(parser, good, bad):
    for text, expected in good:
        assert parser(text) == expected
    for text in bad:
        with pytest.raises(ValueError):
            parser(text)


def test_option_flag_and_env_names():
    option = Option("buffer_size", positive_int, 3, "help")
    assert option.flag == "--buffer-size" and option.env_var == "FEDQ_BUFFER_SIZE"


def test_job_name_with_trailing_newline_is_rejected():
    with pytest.raises(SettingsError):
        resolve(parse("--job", "demo\n"), OPTIONS, environ={})


def test_tls_files_must_exist_and_a_certificate_comes_with_its_key(tmp_path):
    from fedq.common import tls

    with pytest.raises(SettingsError, match="does not exist"):
        resolve(parse("--job", "demo", "--tls-ca", str(tmp_path / "missing.pem")), OPTIONS, environ={})
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(SettingsError, match="certificate and its key together"):
        resolve(parse("--job", "demo", "--tls-cert", str(tmp_path / "cert.pem")), OPTIONS, environ={})
    resolve(parse("--job", "demo"), OPTIONS, environ={"FEDQ_TLS_CA": str(tmp_path / "cert.pem")})
    assert tls.configured().ca_file == str(tmp_path / "cert.pem")
    tls.configure(tls.TLSFiles())


def test_a_url_is_shown_without_its_password():
    from fedq.common.settings import redact_url

    assert redact_url("amqps://site-3:s3cret@rabbit:5671/") == "amqps://site-3:***@rabbit:5671/"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_an_amqp_url_may_list_the_nodes_of_a_cluster():
    from fedq.common.settings import amqp_urls, redact_url
    from fedq.coordinator.ops.admin import site_url

    nodes = "amqp://u:pw@rabbit-1:5672/jobs, amqp://u:pw@rabbit-2:5673/jobs,amqp://u:pw@rabbit-3/jobs"
    values = resolve(parse("--job", "demo", "--amqp-url", nodes), OPTIONS, environ={})
    assert amqp_urls(values["amqp_url"]) == [
        "amqp://u:pw@rabbit-1:5672/jobs",
        "amqp://u:pw@rabbit-2:5673/jobs",
        "amqp://u:pw@rabbit-3/jobs",
    ]
    assert redact_url(values["amqp_url"]).count(":***@") == 3 and "pw" not in redact_url(values["amqp_url"])
    # `fedq admin enroll` writes the site's credentials into every node's URL.
    assert amqp_urls(site_url(values["amqp_url"], "site-1", "s3cret")) == [
        "amqp://site-1:s3cret@rabbit-1:5672/jobs",
        "amqp://site-1:s3cret@rabbit-2:5673/jobs",
        "amqp://site-1:s3cret@rabbit-3/jobs",
    ]
    for mixed, problem in [
        ("amqp://u:pw@rabbit-1/jobs,amqp://u:other@rabbit-2/jobs", "same user, password and virtual host"),
        ("amqp://u:pw@rabbit-1/jobs,amqp://u:pw@rabbit-2/", "same user, password and virtual host"),
        ("amqp://u:pw@rabbit-1/,rabbit-2", "starts with amqp://"),
        (" , ", "names no broker"),
    ]:
        with pytest.raises(SettingsError, match=problem):
            resolve(parse("--job", "demo", "--amqp-url", mixed), OPTIONS, environ={})


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_command_prints_its_help(command, capsys):
    # argparse formats help texts with %: a bare "80 %" in one option's help once made
    # `fedq coordinator --help` a traceback.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: fedq {command}" in capsys.readouterr().out


def test_a_flag_the_configuration_ignores_is_refused_and_a_shared_setting_is_named(capsys):
    from fedq.coordinator.service.cli import check_combinations

    values = {
        "algorithm": "fedasync",
        "robust": "mean",
        "staleness_bound": "adaptive",
        "round_seconds": None,
        "server_optimizer": "sgd",
        "target": 0.9,
    }
    with pytest.raises(SettingsError, match="--buffer-size has no effect without --algorithm fedbuff"):
        check_combinations(values, {"buffer_size": "--buffer-size"})
    check_combinations(values, {"buffer_size": "FEDQ_BUFFER_SIZE"})
    assert "FEDQ_BUFFER_SIZE has no effect without --algorithm fedbuff, and is ignored" in capsys.readouterr().err
    check_combinations({**values, "algorithm": "fedbuff"}, {"buffer_size": "--buffer-size"})
    with pytest.raises(SettingsError, match="is not a score the tasks reach"):
        check_combinations({**values, "target": 90.0}, {"target": "--target"})


def test_a_file_of_this_commands_own_keys_is_read_without_asking_every_command(tmp_path):
    # Asking means importing every command's module (about a second): not for a site's own job file.
    def every_command():
        raise AssertionError("asked every command")

    config = job_file(tmp_path, '[job]\njob = "j"\namqp_url = "amqp://site/"\n')
    values = resolve(
        parse_as("status", STATUS_OPTIONS, "--config", config), STATUS_OPTIONS, environ={}, commands=every_command
    )
    assert values == {"job": "j", "amqp_url": "amqp://site/"}
