"""Loading, validating and rendering the configuration (captured.service.config, captured.service.configfile),
the declarations it is checked against (configcheck, settings, datacapture), the README table rendered from
them, and `captured check`'s look at the host."""

from __future__ import annotations

import grp
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest

from captured.errors import ConfigError
from captured.service import configcheck
from captured.service.cli import main
from captured.service.config import Config, load_config, readme_table, render_toml
from captured.service.configfile import Overrides
from captured.service.datacapture import (
    CONTENT_TYPE_PATTERN,
    CaptureContentTypeHeader,
    CaptureOption,
    DataCaptureConfig,
)
from captured.service.settings import IngestConfig, SpoolConfig
from captured.wire.rules import NAME_PATTERN, valid_name

# Short socket directories: the default <cwd>/captured-data could pass the 107-byte limit under a long
# pytest tmp_path, which is not what these tests are about.
ENV = {"RUNTIME_DIRECTORY": "/run/captured"}

ISSUE_TOML = """\
endpoint_name = "churn-endpoint"
variant_name  = "AllTraffic"
socket_path   = "/run/captured/capture.sock"
spool_dir     = "/var/spool/captured"

[DataCaptureConfig]
EnableCapture = true
InitialSamplingPercentage = 20
DestinationS3Uri = "file:///var/lib/captured/out"
CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]
[DataCaptureConfig.CaptureContentTypeHeader]
CsvContentTypes  = ["text/csv"]
JsonContentTypes = ["application/json"]

[spool]
max_file_age_s = 60
max_file_bytes = 67108864
"""

# What CreateEndpointConfig takes and DescribeEndpointConfig returns (boto3 shape).
SAGEMAKER_DCC = {
    "EnableCapture": True,
    "InitialSamplingPercentage": 20,
    "DestinationS3Uri": "s3://my-bucket/datacapture",
    "KmsKeyId": "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
    "CaptureContentTypeHeader": {
        "CsvContentTypes": ["text/csv"],
        "JsonContentTypes": ["application/json", "application/jsonlines"],
    },
}
EXPECTED_DCC = DataCaptureConfig(
    InitialSamplingPercentage=20,
    DestinationS3Uri="s3://my-bucket/datacapture",
    CaptureOptions=(CaptureOption("Input"), CaptureOption("Output")),
    EnableCapture=True,
    KmsKeyId="arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    CaptureContentTypeHeader=CaptureContentTypeHeader(
        CsvContentTypes=("text/csv",), JsonContentTypes=("application/json", "application/jsonlines")
    ),
)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems_of(tmp_path: Path, toml: str | None = None, **kwargs: object) -> list[str]:
    config_path = None
    if toml is not None:
        write(tmp_path / "config.toml", toml)
        config_path = "config.toml"  # relative to cwd, and so named as given in problems
    with pytest.raises(ConfigError) as info:
        load_config(config_path, environ=ENV, cwd=str(tmp_path), **kwargs)  # type: ignore[arg-type]
    return info.value.problems


# --- defaults --------------------------------------------------------------------------------------------


def test_defaults_without_systemd_directories() -> None:
    cfg = load_config(environ={}, cwd="/srv/app")
    assert cfg == Config(
        endpoint_name="local-endpoint",
        variant_name="AllTraffic",
        socket_path="/srv/app/captured-data/capture.sock",
        spool_dir="/srv/app/captured-data/spool",
        DataCaptureConfig=DataCaptureConfig(
            InitialSamplingPercentage=100,
            DestinationS3Uri="file:///srv/app/captured-data/out",
            CaptureOptions=(CaptureOption("Input"), CaptureOption("Output")),
            EnableCapture=True,
            CaptureContentTypeHeader=CaptureContentTypeHeader(
                CsvContentTypes=("text/csv",), JsonContentTypes=("application/json",)
            ),
        ),
        spool=SpoolConfig(),
        ingest=IngestConfig(),
    )
    assert cfg.DataCaptureConfig.capture_input and cfg.DataCaptureConfig.capture_output


def test_defaults_with_systemd_directories_take_the_first_path() -> None:
    environ = {"RUNTIME_DIRECTORY": "/run/captured:/run/other", "STATE_DIRECTORY": "/var/lib/captured"}
    cfg = load_config(environ=environ, cwd="/srv/app")
    assert cfg.socket_path == "/run/captured/capture.sock"
    assert cfg.spool_dir == "/var/lib/captured/spool"
    assert cfg.DataCaptureConfig.DestinationS3Uri == "file:///var/lib/captured/out"


def test_defaults_read_os_environ_and_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/x")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    cfg = load_config()
    assert cfg.socket_path == "/run/x/capture.sock"
    assert cfg.spool_dir == os.path.join(os.getcwd(), "captured-data", "spool")


def test_default_socket_path_too_long_is_reported() -> None:
    problems = problems_of_defaults(cwd="/" + "d" * 120)
    assert len(problems) == 1
    assert problems[0].startswith("socket_path = '/ddd")
    assert "AF_UNIX sun_path" in problems[0]


def problems_of_defaults(cwd: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, cwd=cwd)
    return info.value.problems


# --- the TOML file ---------------------------------------------------------------------------------------


def test_issue_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "captured.toml", ISSUE_TOML), environ={}, cwd=str(tmp_path))
    assert cfg.endpoint_name == "churn-endpoint"
    assert cfg.variant_name == "AllTraffic"
    assert cfg.socket_path == "/run/captured/capture.sock"
    assert cfg.spool_dir == "/var/spool/captured"
    dcc = cfg.DataCaptureConfig
    assert dcc.InitialSamplingPercentage == 20
    assert dcc.DestinationS3Uri == "file:///var/lib/captured/out"
    assert dcc.CaptureOptions == (CaptureOption("Input"), CaptureOption("Output"))
    assert dcc.CaptureContentTypeHeader == CaptureContentTypeHeader(("text/csv",), ("application/json",))
    assert cfg.spool == SpoolConfig(max_file_age_s=60.0, max_file_bytes=64 * 1024 * 1024)
    assert isinstance(cfg.spool.max_file_age_s, float)
    assert cfg.ingest == IngestConfig()


def test_toml_table_replaces_the_default_data_capture_config_as_a_whole(tmp_path: Path) -> None:
    toml = '[DataCaptureConfig]\nInitialSamplingPercentage = 5\nDestinationS3Uri = "s3://bkt"\n'
    toml += 'CaptureOptions = [{ CaptureMode = "Output" }]\n'
    cfg = load_config(write(tmp_path / "c.toml", toml), environ=ENV, cwd=str(tmp_path))
    dcc = cfg.DataCaptureConfig
    assert dcc == DataCaptureConfig(5, "s3://bkt", (CaptureOption("Output"),))
    assert dcc.CaptureContentTypeHeader is None  # not inherited from the defaults: everything BASE64
    assert not dcc.capture_input and dcc.capture_output


def test_toml_table_needs_the_required_keys(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "[DataCaptureConfig]\nEnableCapture = false\n")
    assert [p.split(":")[1] for p in problems] == [
        " DataCaptureConfig.InitialSamplingPercentage",
        " DataCaptureConfig.DestinationS3Uri",
        " DataCaptureConfig.CaptureOptions",
    ]
    assert all(p.startswith("config.toml: ") and "missing, required" in p for p in problems)


def test_empty_toml_gives_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.toml", "# nothing\n"), environ=ENV, cwd=str(tmp_path))
    assert cfg == load_config(environ=ENV, cwd=str(tmp_path))


def test_toml_syntax_error_is_one_problem_among_others(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "endpoint_name = \n", overrides=Overrides(variant_name="a b"))
    assert len(problems) == 2
    assert problems[0].startswith("config.toml: invalid TOML: ")
    assert problems[1].startswith("variant_name = 'a b': ")


def test_unreadable_files_are_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("nope.toml", "nope.json", environ=ENV, cwd=str(tmp_path))
    assert info.value.problems == [
        "nope.toml: cannot read: No such file or directory",
        "nope.json: cannot read: No such file or directory",
    ]


def test_non_utf8_toml_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_bytes(b'endpoint_name = "\xff"\n')
    with pytest.raises(ConfigError, match=r"^c.toml: cannot read: .*utf-8"):
        load_config("c.toml", environ=ENV, cwd=str(tmp_path))


# --- every rule ------------------------------------------------------------------------------------------

BASE = {
    "": {"endpoint_name": '"churn"'},
    "DataCaptureConfig": {
        "InitialSamplingPercentage": "20",
        "DestinationS3Uri": '"s3://my-bucket/capture"',
        "CaptureOptions": '[{ CaptureMode = "Input" }]',
    },
    "spool": {},
    "ingest": {},
    "s3": {},
    "watermark": {},
    "delivery": {},
}


def toml_with(setting: str, literal: str) -> str:
    """BASE as TOML text with `setting` (a dotted key: table, then key) set to the TOML `literal`."""
    section, _, key = setting.rpartition(".")
    tables = {name: dict(keys) for name, keys in BASE.items()}
    tables[section][key] = literal
    lines = []
    for name, keys in tables.items():
        if name and not keys:
            continue  # leaves room for a top-level `spool = 5`
        lines += [f"[{name}]"] if name else []
        lines += [f"{k} = {v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


D = "DataCaptureConfig"
PCT = "DataCaptureConfig.InitialSamplingPercentage"
DEST = "DataCaptureConfig.DestinationS3Uri"
KMS = "DataCaptureConfig.KmsKeyId"
OPTS = "DataCaptureConfig.CaptureOptions"
HDR = "DataCaptureConfig.CaptureContentTypeHeader"
NAME_RULE = "letters, digits or hyphens, starting and ending with a letter or digit"
BUCKET_RULE = "bucket name must be 3 to 63 lowercase letters"
PERCENT_RULE = "must be an integer from 0 to 100"
MODE_RULE = "must be one of Input, Output, InputAndOutput (or the SDK's REQUEST, RESPONSE)"
MEDIA_RULE = "must be a media type such as text/csv"
AGE_RULE = "greater than 0 and at most 3600"
FILE_BYTES_RULE = "must be an integer from 1024 to 5368709120"
FRAME_RULE = "two 6 MiB bodies plus 64 KiB"
DRAIN_RULE = "must be a number of seconds from 0 to 600"

# (setting, its TOML literal, what the problem's key adds to the setting, the value as shown, the rule)
RULES = [
    ("endpoint_name", '"churn_endpoint"', "", "'churn_endpoint'", NAME_RULE),
    ("endpoint_name", '""', "", "''", NAME_RULE),
    ("endpoint_name", '"-churn"', "", "'-churn'", NAME_RULE),
    ("endpoint_name", '"churn-"', "", "'churn-'", NAME_RULE),
    ("endpoint_name", f'"{"a" * 64}"', "", "'aaaa", NAME_RULE),
    ("endpoint_name", '"../etc"', "", "'../etc'", NAME_RULE),
    ("variant_name", '"All Traffic"', "", "'All Traffic'", NAME_RULE),
    ("variant_name", "7", "", "7", NAME_RULE),
    ("socket_path", f'"/{"s" * 110}"', "", "'/sss", "is 111 bytes long, must be at most 107 bytes"),
    ("socket_path", f'"/{"é" * 54}"', "", "'/éé", "(the AF_UNIX sun_path limit)"),
    ("socket_path", "5", "", "5", "must be a non-empty path"),
    ("spool_dir", '""', "", "''", "must be a non-empty path"),
    ("spool_dir", "[]", "", "[]", "must be a non-empty path"),
    ("spool_dir", '"/a\\u0000b"', "", "'/a\\x00b'", "must be a non-empty path"),
    ("colour", '"blue"', "", "'blue'", "unknown key"),
    ("spool", "5", "", "5", "must be a table"),
    (f"{D}.EnableCapture", '"yes"', "", "'yes'", "must be a boolean"),
    (PCT, "150", "", "150", PERCENT_RULE),
    (PCT, "-1", "", "-1", PERCENT_RULE),
    (PCT, "true", "", "True", PERCENT_RULE),
    (PCT, '"20"', "", "'20'", PERCENT_RULE),
    (PCT, "20.0", "", "20.0", PERCENT_RULE),
    (DEST, '"https://b.s3.amazonaws.com/x"', "", "'https://b.s3", "use the s3://bucket/prefix form"),
    (DEST, '"ftp://host/x"', "", "'ftp://host/x'", "unsupported scheme"),
    (DEST, '"S3://bucket/x"', "", "'S3://bucket/x'", "unsupported scheme"),
    (DEST, '"s3:bucket/x"', "", "'s3:bucket/x'", "must be s3://bucket[/prefix]"),
    (DEST, '"s3://My-Bucket/x"', "", "'s3://My-Bucket/x'", BUCKET_RULE),
    (DEST, '"s3://ab/x"', "", "'s3://ab/x'", BUCKET_RULE),
    (DEST, f'"s3://{"b" * 64}"', "", "'s3://bbb", BUCKET_RULE),
    (DEST, '"s3://my..bucket"', "", "'s3://my..bucket'", BUCKET_RULE),
    (DEST, '"s3://-bucket/x"', "", "'s3://-bucket/x'", BUCKET_RULE),
    (DEST, '"s3://bucket-/x"', "", "'s3://bucket-/x'", BUCKET_RULE),
    (DEST, '"s3://my_bucket"', "", "'s3://my_bucket'", BUCKET_RULE),
    (DEST, '"s3://192.168.1.2/x"', "", "'s3://192.168.1.2/x'", "not be an IP address"),
    (DEST, '"s3://"', "", "'s3://'", BUCKET_RULE),
    (DEST, '"s3://bucket//x"', "", "'s3://bucket//x'", "must not contain '//'"),
    (DEST, '"s3://bucket/a//b"', "", "'s3://bucket/a//b'", "must not contain '//'"),
    (DEST, '"s3://bucket/a//"', "", "'s3://bucket/a//'", "must not contain '//'"),
    (DEST, f'"s3://bucket/{"p" * 501}"', "", "'s3://bucket/ppp", "at most 512 characters"),
    (DEST, '"file://host/x"', "", "'file://host/x'", "must be file:///absolute/path"),
    (DEST, '""', "", "''", "must be s3://bucket[/prefix]"),
    (DEST, '"/a\\u0000b"', "", "'/a\\x00b'", "must not contain a NUL character"),
    (DEST, '"out:2024"', "", "'out:2024'", "unsupported scheme"),
    (DEST, "5", "", "5", "must be s3://bucket[/prefix]"),
    (KMS, '"alias/my key"', "", "'alias/my key'", "[a-zA-Z0-9:/_-]"),
    (KMS, f'"{"k" * 2049}"', "", "'kkk", "at most 2048"),
    (KMS, "1", "", "1", "must be a KMS key id"),
    (OPTS, "[]", "", "[]", "list of 1 to 32 capture options"),
    (OPTS, '{ CaptureMode = "Input" }', "", "{'CaptureMode'", "list of 1 to 32"),
    (OPTS, "[" + '{ CaptureMode = "Input" },' * 33 + "]", "", "[{'Capture", "list of 1 to 32"),
    (OPTS, '[{ CaptureMode = "Both" }]', "[0].CaptureMode", "'Both'", MODE_RULE),
    (OPTS, '[{ CaptureMode = "Input" }, { CaptureMode = "input" }]', "[1].CaptureMode", "'input'", MODE_RULE),
    (OPTS, '["Input"]', "[0]", "'Input'", "must be a table"),
    (f"{D}.Colour", '"blue"', "", "'blue'", "unknown key (known: InitialSamplingPercentage"),
    (HDR, '"text/csv"', "", "'text/csv'", "must be a table"),
    (HDR, "{ CsvContentTypes = [] }", ".CsvContentTypes", "[]", "list of 1 to 10 content types"),
    (HDR, '{ CsvContentTypes = "text/csv" }', ".CsvContentTypes", "'text/csv'", "list of 1 to 10"),
    (HDR, "{ JsonContentTypes = [" + '"a/b",' * 11 + "] }", ".JsonContentTypes", "['a/b'", "1 to 10"),
    (HDR, '{ CsvContentTypes = ["text/csv;q=1"] }', ".CsvContentTypes[0]", "'text/csv;q=1'", MEDIA_RULE),
    (
        HDR,
        '{ JsonContentTypes = ["application/json", "json"] }',
        ".JsonContentTypes[1]",
        "'json'",
        MEDIA_RULE,
    ),
    (HDR, '{ JsonContentTypes = ["a/.json"] }', ".JsonContentTypes[0]", "'a/.json'", MEDIA_RULE),
    (HDR, f'{{ JsonContentTypes = ["a/{"b" * 300}"] }}', ".JsonContentTypes[0]", "'a/bbb", "1 to 256"),
    (HDR, "{ JsonContentTypes = [5] }", ".JsonContentTypes[0]", "5", MEDIA_RULE),
    (HDR, '{ Other = ["a/b"] }', ".Other", "['a/b']", "unknown key"),
    ("spool.max_file_age_s", "0", "", "0", AGE_RULE),
    ("spool.max_file_age_s", "3601", "", "3601", AGE_RULE),
    ("spool.max_file_age_s", "nan", "", "nan", AGE_RULE),
    ("spool.max_file_age_s", '"60"', "", "'60'", "must be a number"),
    ("spool.max_file_age_s", "false", "", "False", "must be a number"),
    ("spool.max_file_bytes", "1023", "", "1023", FILE_BYTES_RULE),
    ("spool.max_file_bytes", str(5 * 2**30 + 1), "", "5368709121", FILE_BYTES_RULE),
    ("spool.max_file_bytes", "1.5e6", "", "1500000.0", FILE_BYTES_RULE),
    (
        "spool.rotate_s",
        "1",
        "",
        "1",
        "unknown key (known: max_file_age_s, max_file_bytes, fsync_interval_s, max_open_files)",
    ),
    ("ingest.max_frame_bytes", "1048576", "", "1048576", FRAME_RULE),
    ("ingest.max_frame_bytes", str(12 * 2**20), "", "12582912", FRAME_RULE),
    ("ingest.max_frame_bytes", str(257 * 2**20), "", "269484032", "to 268435456 (256 MiB)"),
    ("ingest.drain_timeout_s", "-1", "", "-1", DRAIN_RULE),
    ("ingest.drain_timeout_s", "600.5", "", "600.5", DRAIN_RULE),
    ("ingest.drain_timeout_s", "inf", "", "inf", DRAIN_RULE),
    ("s3.endpoint_url", '"localhost:9000"', "", "'localhost:9000'", "http:// or https:// URL"),
    ("s3.region", '"US East"', "", "'US East'", "AWS region name"),
    ("s3.multipart_threshold_bytes", str(5 * 2**20 - 1), "", "5242879", "from 5 MiB"),
    ("s3.part_size_bytes", str(5 * 2**30 + 1), "", "5368709121", "5 MiB to 5 GiB"),
    ("s3.max_concurrent_uploads", "0", "", "0", "from 1 to 64"),
    ("s3.max_concurrent_parts", "257", "", "257", "from 1 to 256"),
    ("s3.shutdown_timeout_s", "-1", "", "-1", "from 0 to 3600"),
    ("s3.fatal_retry_s", "0.5", "", "0.5", "from 1 to 3600"),
    ("s3.request_timeout_s", "nan", "", "nan", "from 1 to 3600"),
    ("s3.uploader_nice", "20", "", "20", "from 0 to 19"),
    ("s3.uploader_nice", "-5", "", "-5", "from 0 to 19"),
    ("s3.part_bytes", "1", "", "1", "unknown key"),
    ("spool.fsync_interval_s", "-1", "", "-1", "from 0 (only when a file is sealed) to 3600"),
    ("watermark.high_percent", "0", "", "0", "greater than 0 and at most 100"),
    ("watermark.high_percent", "101", "", "101", "greater than 0 and at most 100"),
    ("watermark.low_percent", "75", "", "75", "below high_percent (75)"),
    ("watermark.min_free_bytes", "-1", "", "-1", "from 0"),
    ("ingest.socket_mode", "0o1777", "", "1023", "permission bits"),
    ("ingest.socket_mode", '"rw-rw----"', "", "'rw-rw----'", "permission bits"),
    ("ingest.socket_group", '"no such group"', "", "'no such group'", "group name or a gid"),
    ("ingest.allowed_uids", "[-1]", "", "[-1]", "numeric ids"),
    ("ingest.allowed_gids", '["root"]', "", "['root']", "numeric ids"),
]


@pytest.mark.parametrize(("setting", "literal", "suffix", "shown", "rule"), RULES)
def test_rule_rejected_with_key_value_and_rule(
    tmp_path: Path, setting: str, literal: str, suffix: str, shown: str, rule: str
) -> None:
    problems = problems_of(tmp_path, toml_with(setting, literal))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"config.toml: {setting}{suffix} = {shown}"), problems[0]
    assert rule in problems[0]
    assert "\n" not in problems[0] and len(problems[0]) < 400


def test_base_of_the_rule_table_is_valid(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "config.toml", toml_with("variant_name", '"v1"')), environ=ENV)
    assert (cfg.endpoint_name, cfg.variant_name) == ("churn", "v1")


@pytest.mark.parametrize(
    "literal",
    [
        '"s3://my-bucket"',
        '"s3://my-bucket/"',
        '"s3://my-bucket/data/capture/"',
        '"s3://my.bucket-1/a.b/c-d_e"',
        '"s3://abc/x"',
        f'"s3://{"b" * 63}/x"',
    ],
)
def test_s3_destinations_accepted_verbatim(tmp_path: Path, literal: str) -> None:
    path = write(tmp_path / "config.toml", toml_with(DEST, literal))
    cfg = load_config(path, environ=ENV, cwd=str(tmp_path))
    assert cfg.DataCaptureConfig.DestinationS3Uri == literal.strip('"')


def test_https_destination_refused_with_the_s3_hint() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=Overrides(destination="https://s3.amazonaws.com/b/x"), environ=ENV, cwd="/")
    assert info.value.problems == [
        "DataCaptureConfig.DestinationS3Uri = 'https://s3.amazonaws.com/b/x':"
        " https:// destinations are not supported: use the s3://bucket/prefix form"
    ]


def test_capture_option_with_wrong_key_reports_both(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, toml_with(OPTS, '[{ Mode = "Input" }]'))
    assert problems == [
        "config.toml: DataCaptureConfig.CaptureOptions[0].Mode = 'Input': unknown key (known: CaptureMode)",
        "config.toml: DataCaptureConfig.CaptureOptions[0].CaptureMode: missing, required:"
        " must be one of Input, Output, InputAndOutput (or the SDK's REQUEST, RESPONSE)",
    ]


def test_strange_unknown_keys_stay_on_one_line(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '"a\\nb" = 1\n')
    assert problems == [
        "config.toml: 'a\\nb' = 1: unknown key (known: " + ", ".join(Config.__struct_fields__) + ")"
    ]


def test_long_values_are_truncated(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, toml_with("variant_name", f'"{"v" * 1000}"'))
    assert "vvv...:" in problem and len(problem) < 300


def test_many_problems_reported_together(tmp_path: Path) -> None:
    toml = """\
endpoint_name = "churn_endpoint"
extra = 1

[DataCaptureConfig]
InitialSamplingPercentage = 150
DestinationS3Uri = "https://example.com/x"
CaptureOptions = [{ CaptureMode = "Everything" }]

[ingest]
max_frame_bytes = 1
"""
    write(tmp_path / "config.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_config(
            "config.toml", overrides=Overrides(variant_name="no/slash"), environ=ENV, cwd=str(tmp_path)
        )
    keys = [p.split(" = ")[0] for p in info.value.problems]
    assert keys == [
        "config.toml: extra",
        "config.toml: endpoint_name",
        "variant_name",  # from an override: no file to name
        "config.toml: DataCaptureConfig.InitialSamplingPercentage",
        "config.toml: DataCaptureConfig.DestinationS3Uri",
        "config.toml: DataCaptureConfig.CaptureOptions[0].CaptureMode",
        "config.toml: ingest.max_frame_bytes",
    ]
    assert str(info.value) == "\n".join(info.value.problems)
    assert len(str(info.value).splitlines()) == 7


# --- the SageMaker JSON file -----------------------------------------------------------------------------

CREATE_ENDPOINT_CONFIG_REQUEST = {
    "EndpointConfigName": "churn-config",
    "ProductionVariants": [
        {
            "VariantName": "AllTraffic",
            "ModelName": "churn-model",
            "InitialInstanceCount": 1,
            "InstanceType": "ml.m5.xlarge",
        }
    ],
    "DataCaptureConfig": SAGEMAKER_DCC,
    "Tags": [{"Key": "team", "Value": "ml"}],
}
DESCRIBE_ENDPOINT_CONFIG_RESPONSE = {
    "EndpointConfigName": "churn-config",
    "EndpointConfigArn": "arn:aws:sagemaker:us-west-2:111122223333:endpoint-config/churn-config",
    "ProductionVariants": [
        {
            "VariantName": "AllTraffic",
            "ModelName": "churn-model",
            "InitialInstanceCount": 1,
            "InstanceType": "ml.m5.xlarge",
            "InitialVariantWeight": 1.0,
        }
    ],
    "DataCaptureConfig": SAGEMAKER_DCC,
    "CreationTime": "2024-01-19T19:20:03.123000+00:00",
    "EnableNetworkIsolation": False,
    "ResponseMetadata": {
        "RequestId": "5f7ad1f0-4a1e-4d3c-9d2e-0a7c0f4c1a11",
        "HTTPStatusCode": 200,
        "HTTPHeaders": {"content-type": "application/x-amz-json-1.1", "content-length": "812"},
        "RetryAttempts": 0,
    },
}


@pytest.mark.parametrize(
    "document",
    [SAGEMAKER_DCC, CREATE_ENDPOINT_CONFIG_REQUEST, DESCRIBE_ENDPOINT_CONFIG_RESPONSE],
    ids=["bare", "create-request", "describe-response"],
)
def test_json_forms(tmp_path: Path, document: dict[str, object]) -> None:
    path = write(tmp_path / "endpoint-config.json", json.dumps(document, indent=2))
    cfg = load_config(data_capture_path=path, environ=ENV, cwd=str(tmp_path))
    assert cfg.DataCaptureConfig == EXPECTED_DCC


def test_json_replaces_the_toml_table_as_a_whole(tmp_path: Path) -> None:
    toml = toml_with(KMS, '"alias/mine"')
    bare = {
        "InitialSamplingPercentage": 7,
        "DestinationS3Uri": "s3://other",
        "CaptureOptions": [{"CaptureMode": "Input"}],
    }
    cfg = load_config(
        write(tmp_path / "c.toml", toml),
        write(tmp_path / "d.json", json.dumps(bare)),
        environ=ENV,
        cwd=str(tmp_path),
    )
    assert cfg.endpoint_name == "churn"  # the rest of the TOML stays
    assert cfg.DataCaptureConfig == DataCaptureConfig(7, "s3://other", (CaptureOption("Input"),))


def test_relative_destination_in_json_resolves_against_its_directory(tmp_path: Path) -> None:
    document = {**SAGEMAKER_DCC, "DestinationS3Uri": "captures"}
    write(tmp_path / "aws" / "d.json", json.dumps(document))
    cfg = load_config(data_capture_path="aws/d.json", environ=ENV, cwd=str(tmp_path))
    assert cfg.DataCaptureConfig.DestinationS3Uri == "file://" + str(tmp_path / "aws" / "captures")


def test_json_problems_name_the_json_file(tmp_path: Path) -> None:
    document = {**DESCRIBE_ENDPOINT_CONFIG_RESPONSE, "DataCaptureConfig": {**SAGEMAKER_DCC, "Extra": 1}}
    document["DataCaptureConfig"]["InitialSamplingPercentage"] = 101  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        load_config(data_capture_path=write(tmp_path / "d.json", json.dumps(document)), environ=ENV, cwd="/")
    assert [p.split(":", 2)[:2] for p in info.value.problems] == [
        [str(tmp_path / "d.json"), " DataCaptureConfig.Extra = 1"],
        [str(tmp_path / "d.json"), " DataCaptureConfig.InitialSamplingPercentage = 101"],
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "d.json: invalid JSON: Expecting property name"),
        ("[1, 2]", "d.json: must hold a JSON object"),
        ('{"EndpointConfigName": "x"}', "d.json: no DataCaptureConfig found"),
        ('{"DataCaptureConfig": null}', "d.json: DataCaptureConfig = None: must be a table"),
    ],
)
def test_bad_json_files(tmp_path: Path, text: str, problem: str) -> None:
    write(tmp_path / "d.json", text)
    with pytest.raises(ConfigError) as info:
        load_config(data_capture_path="d.json", environ=ENV, cwd=str(tmp_path))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(problem)


@pytest.mark.parametrize(
    ("modes", "normalised", "capture_input", "capture_output"),
    [
        (["REQUEST", "RESPONSE"], ("Input", "Output"), True, True),
        (["REQUEST"], ("Input",), True, False),
        (["RESPONSE"], ("Output",), False, True),
        (["InputAndOutput"], ("InputAndOutput",), True, True),
        (["Output", "Output"], ("Output", "Output"), False, True),
    ],
)
def test_capture_modes_sdk_spellings(
    tmp_path: Path, modes: list[str], normalised: tuple[str, ...], capture_input: bool, capture_output: bool
) -> None:
    document = {**SAGEMAKER_DCC, "CaptureOptions": [{"CaptureMode": m} for m in modes]}
    cfg = load_config(data_capture_path=write(tmp_path / "d.json", json.dumps(document)), environ=ENV)
    dcc = cfg.DataCaptureConfig
    assert tuple(o.CaptureMode for o in dcc.CaptureOptions) == normalised
    assert (dcc.capture_input, dcc.capture_output) == (capture_input, capture_output)


# --- overrides and paths ---------------------------------------------------------------------------------


def test_overrides_win_over_file_values(tmp_path: Path) -> None:
    overrides = Overrides(
        socket_path="/run/o.sock",
        spool_dir="/var/o",
        destination="s3://override-bucket/x/",
        endpoint_name="ep-2",
        variant_name="v2",
        sampling_percentage=0,
    )
    path = write(tmp_path / "c.toml", ISSUE_TOML)
    cfg = load_config(path, overrides=overrides, environ=ENV, cwd=str(tmp_path))
    assert (cfg.endpoint_name, cfg.variant_name) == ("ep-2", "v2")
    assert (cfg.socket_path, cfg.spool_dir) == ("/run/o.sock", "/var/o")
    assert cfg.DataCaptureConfig.DestinationS3Uri == "s3://override-bucket/x/"
    assert cfg.DataCaptureConfig.InitialSamplingPercentage == 0
    assert cfg.DataCaptureConfig.CaptureOptions == (CaptureOption("Input"), CaptureOption("Output"))


def test_override_mends_a_bad_file_value(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", toml_with(PCT, "150"))
    cfg = load_config(path, overrides=Overrides(sampling_percentage=30), environ=ENV, cwd=str(tmp_path))
    assert cfg.DataCaptureConfig.InitialSamplingPercentage == 30


def test_bad_override_names_no_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", ISSUE_TOML)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=Overrides(sampling_percentage=101), environ=ENV, cwd=str(tmp_path))
    assert info.value.problems == [
        "DataCaptureConfig.InitialSamplingPercentage = 101: must be an integer from 0 to 100"
    ]


def test_relative_paths_in_toml_resolve_against_its_directory(tmp_path: Path) -> None:
    toml = 'socket_path = "run/c.sock"\nspool_dir = "../spool/"\n'
    toml += '[DataCaptureConfig]\nInitialSamplingPercentage = 1\nDestinationS3Uri = "out"\n'
    toml += 'CaptureOptions = [{ CaptureMode = "Input" }]\n'
    write(tmp_path / "etc" / "c.toml", toml)
    cfg = load_config("etc/c.toml", environ=ENV, cwd=str(tmp_path))
    assert cfg.socket_path == str(tmp_path / "etc" / "run" / "c.sock")
    assert cfg.spool_dir == str(tmp_path / "spool")
    assert cfg.DataCaptureConfig.DestinationS3Uri == "file://" + str(tmp_path / "etc" / "out")


def test_relative_paths_in_overrides_resolve_against_cwd(tmp_path: Path) -> None:
    overrides = Overrides(socket_path="c.sock", spool_dir="./s", destination="o/")
    write(tmp_path / "etc" / "c.toml", ISSUE_TOML)
    cfg = load_config("etc/c.toml", overrides=overrides, environ=ENV, cwd=str(tmp_path))
    assert cfg.socket_path == str(tmp_path / "c.sock")
    assert cfg.spool_dir == str(tmp_path / "s")
    assert cfg.DataCaptureConfig.DestinationS3Uri == "file://" + str(tmp_path / "o")


@pytest.mark.parametrize(
    ("destination", "stored"),
    [
        ("/var/lib/captured/out", "file:///var/lib/captured/out"),
        ("/var/lib/captured/out/", "file:///var/lib/captured/out"),
        ("file:///var/lib/captured/../out/", "file:///var/lib/out"),
        ("file:///", "file:///"),
        ("out", "file:///srv/app/out"),
    ],
)
def test_local_destinations_normalised(destination: str, stored: str) -> None:
    cfg = load_config(overrides=Overrides(destination=destination), environ=ENV, cwd="/srv/app")
    assert cfg.DataCaptureConfig.DestinationS3Uri == stored


# --- names, patterns, rendering --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AllTraffic", "a", "churn-endpoint", "a--b", "0", "A" * 63])
def test_valid_names(name: str) -> None:
    assert valid_name(name)
    assert NAME_PATTERN.fullmatch(name)


@pytest.mark.parametrize("name", ["", "-a", "a-", "a_b", "a.b", "a/b", "A" * 64, "é", "a\n", None, 5, b"ab"])
def test_invalid_names(name: object) -> None:
    assert not valid_name(name)


@pytest.mark.parametrize("media", ["text/csv", "application/json", "application/x-npy", "a/b.c-d", "x--y/z"])
def test_content_type_pattern(media: str) -> None:
    assert CONTENT_TYPE_PATTERN.fullmatch(media)
    assert not CONTENT_TYPE_PATTERN.fullmatch(media + ";")


def test_config_error_str_is_the_problems_one_per_line() -> None:
    error = ConfigError(["a = 1: bad", "b = 2: worse"])
    assert error.problems == ["a = 1: bad", "b = 2: worse"]
    assert str(error) == "a = 1: bad\nb = 2: worse"


def test_loaded_config_holds_tuples(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.toml", ISSUE_TOML), environ=ENV, cwd=str(tmp_path))
    header = cfg.DataCaptureConfig.CaptureContentTypeHeader
    assert header is not None and isinstance(header.CsvContentTypes, tuple)
    assert isinstance(cfg.DataCaptureConfig.CaptureOptions, tuple)


ROUND_TRIP = [
    Config(
        endpoint_name="e",
        variant_name="v",
        socket_path='/tmp/we"ird\\dir\t\x01é/c.sock',
        spool_dir="/var/spool/ça va\n#not a comment",
        DataCaptureConfig=DataCaptureConfig(
            InitialSamplingPercentage=0,
            DestinationS3Uri="s3://bucket/prefix/",
            CaptureOptions=(CaptureOption("InputAndOutput"),),
            EnableCapture=False,
            KmsKeyId="alias/ExampleAlias",
            CaptureContentTypeHeader=CaptureContentTypeHeader(JsonContentTypes=("application/jsonlines",)),
        ),
        spool=SpoolConfig(max_file_age_s=0.25, max_file_bytes=1024),
        ingest=IngestConfig(max_frame_bytes=256 * 2**20, drain_timeout_s=0.0),
    ),
    Config(
        endpoint_name="e",
        variant_name="v",
        socket_path="/c.sock",
        spool_dir="/s",
        DataCaptureConfig=DataCaptureConfig(1, "file:///out", (CaptureOption("Output"),)),
    ),
    Config(
        endpoint_name="e",
        variant_name="v",
        socket_path="/c.sock",
        spool_dir="/s",
        DataCaptureConfig=DataCaptureConfig(
            1, "file:///out", (CaptureOption("Output"),), CaptureContentTypeHeader=CaptureContentTypeHeader()
        ),
    ),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=["everything", "no-header", "empty-header"])
def test_render_toml_round_trips(tmp_path: Path, cfg: Config) -> None:
    text = render_toml(cfg)
    assert text.startswith("# effective configuration\n")
    assert load_config(write(tmp_path / "c.toml", text), environ=ENV, cwd="/elsewhere") == cfg


def test_render_toml_round_trips_loaded_configs(tmp_path: Path) -> None:
    for cfg in (
        load_config(environ={}, cwd="/srv/app"),
        load_config(write(tmp_path / "a.toml", ISSUE_TOML), environ=ENV, cwd=str(tmp_path)),
        load_config(data_capture_path=write(tmp_path / "d.json", json.dumps(SAGEMAKER_DCC)), environ=ENV),
    ):
        assert load_config(write(tmp_path / "c.toml", render_toml(cfg)), environ=ENV) == cfg


def test_render_toml_reads_like_the_issue_example() -> None:
    text = render_toml(load_config(environ={}, cwd="/srv/app"))
    assert 'endpoint_name = "local-endpoint"\n' in text
    assert "\n[DataCaptureConfig]\nInitialSamplingPercentage = 100\n" in text
    assert 'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n' in text
    assert '\n[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n' in text
    assert "\n[spool]\nmax_file_age_s = 60.0\n" in text


# --- declared once: every rule from the field's Meta, the README table from the same declarations --------

README = Path(__file__).resolve().parent.parent / "README.md"


def declared(struct: type[msgspec.Struct], prefix: str = "") -> Iterator[tuple[str, configcheck.Spec]]:
    """Every field of the tree as (dotted key, declaration), tables walked into."""
    for field in configcheck.fields(struct):
        spec = configcheck.spec(field.name, field.type)
        yield prefix + field.name, spec
        if isinstance(spec.type, mi.StructType):
            yield from declared(spec.type.cls, f"{prefix}{field.name}.")


def test_every_setting_is_described() -> None:
    undescribed = [
        key
        for key, spec in declared(Config)
        if not spec.description and not (isinstance(spec.type, mi.StructType) and not spec.optional)
    ]
    assert undescribed == []  # a table such as [spool] needs none: its keys have rows


def test_readme_table_is_the_one_rendered_from_the_declarations() -> None:
    """Regenerate with `python -m captured.service.config README.md` after changing a declaration."""
    assert configcheck.block(README.read_text(encoding="utf-8")) == readme_table()


def test_readme_table_has_a_row_for_every_setting_and_no_other() -> None:
    rows = {line.split(" | ")[0].removeprefix("| ").strip("`") for line in readme_table()[2:]}
    settings = {key for key, spec in declared(Config) if spec.description}
    assert rows == settings
    assert "ingest.max_buffered_bytes" in rows  # was missing from the hand-written table


def test_readme_table_shows_defaults_and_ranges() -> None:
    rows = {line.split(" | ")[0].removeprefix("| ").strip("`"): line for line in readme_table()}
    assert rows["spool.max_open_files"].startswith(
        "| `spool.max_open_files` | `64` | an integer from 1 to 4096 | spool files open at once"
    )
    assert (
        "| `67108864` (64 MiB) | an integer from 12648448 to 17179869184 |"
        in rows["ingest.max_buffered_bytes"]
    )
    assert "| `0o660` |" in rows["ingest.socket_mode"]
    assert "| `100` | required in `[DataCaptureConfig]`; an integer from 0 to 100 |" in rows[PCT]
    assert "each a media type such as text/csv" in rows[f"{HDR}.CsvContentTypes"]


def test_rendering_the_readme_table_replaces_only_the_block() -> None:
    text = f"before\n{configcheck.BLOCK_BEGIN}\nold row\n{configcheck.BLOCK_END}\nafter\n"
    out = configcheck.replace_block(text, ["| a |", "| b |"])
    assert out == f"before\n{configcheck.BLOCK_BEGIN}\n| a |\n| b |\n{configcheck.BLOCK_END}\nafter\n"
    with pytest.raises(ValueError, match="block"):
        configcheck.replace_block("no markers\n", [])


def test_readme_sample_configuration_is_valid(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Configuration") :]
    sample = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert sample is not None
    cfg = load_config(write(tmp_path / "sample.toml", sample.group(1)), environ=ENV, cwd=str(tmp_path))
    assert cfg.endpoint_name == "churn-endpoint"


def numeric_settings() -> Iterator[tuple[str, mi.IntType | mi.FloatType]]:
    for key, spec in declared(Config):
        if isinstance(spec.type, mi.IntType | mi.FloatType) and "parse" not in spec.extra and "." in key:
            yield key, spec.type


def bounds(t: mi.IntType | mi.FloatType) -> Iterator[tuple[float, bool]]:
    """(value, accepted) on both sides of each bound."""
    step = 1 if isinstance(t, mi.IntType) else 0.01
    for inclusive, exclusive, sign in ((t.ge, t.gt, -1), (t.le, t.lt, 1)):
        if inclusive is not None:
            yield inclusive, True
            yield inclusive + sign * step, False
        if exclusive is not None:
            yield exclusive, False
            yield exclusive - sign * step, True


@pytest.mark.parametrize(("setting", "declared_type"), list(numeric_settings()), ids=lambda x: str(x)[:40])
def test_every_declared_bound_is_enforced(
    tmp_path: Path, setting: str, declared_type: mi.IntType | mi.FloatType
) -> None:
    """The one generic walk checks what the field's Meta declares, on both sides of every bound."""
    other = {"watermark.high_percent": "low_percent = 0", "watermark.low_percent": "high_percent = 100"}
    for value, accepted in bounds(declared_type):
        toml = toml_with(setting, repr(value))
        if setting in other:  # the pair must also keep low below high
            toml = toml.replace("[watermark]\n", f"[watermark]\n{other[setting]}\n")
        if accepted:
            load_config(write(tmp_path / "config.toml", toml), environ=ENV, cwd=str(tmp_path))
        else:
            problems = problems_of(tmp_path, toml)
            assert len(problems) == 1 and problems[0].startswith(f"config.toml: {setting} = "), problems


def test_default_low_percent_must_be_below_a_lower_high_percent(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, toml_with("watermark.high_percent", "50"))
    assert problems == [
        "config.toml: watermark.low_percent = 70.0: must be a percentage from 0 to below high_percent (50)"
    ]


def test_a_refused_high_percent_is_not_blamed_on_low_percent(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, toml_with("watermark.high_percent", "101"))
    assert [p.split(" = ")[0] for p in problems] == ["config.toml: watermark.high_percent"]


# --- captured check: what serve would fail on at start, on this host ------------------------------------

NO_GROUP = "captured-no-such-grp"


def host_toml(socket_path: str = "c.sock", spool_dir: str = "spool", ingest: str = "") -> str:
    """BASE as TOML with these paths (relative: to the file's directory) and [ingest] lines."""
    text = f'socket_path = "{socket_path}"\nspool_dir = "{spool_dir}"\n' + toml_with(
        "endpoint_name", '"churn"'
    )
    return text + (f"[ingest]\n{ingest}\n" if ingest else "")


def host_problems(base: Path, toml: str) -> list[str]:
    """The problems `captured check` finds in `toml` written to `base`/config.toml."""
    write(base / "config.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_config("config.toml", environ=ENV, cwd=str(base), check_host=True)
    return info.value.problems


def test_check_host_refuses_an_unknown_socket_group(short_tmp: Path) -> None:
    try:
        grp.getgrnam(NO_GROUP)
        pytest.skip(f"this host has a group named {NO_GROUP}")
    except KeyError:
        pass
    toml = host_toml(socket_path="run/c.sock", ingest=f'socket_group = "{NO_GROUP}"')
    assert host_problems(short_tmp, toml) == [
        f"config.toml: ingest.socket_group = '{NO_GROUP}': no such group on this host"
    ]
    assert not (short_tmp / "run").exists() and not (short_tmp / "spool").exists()  # nothing created
    load_config("config.toml", environ=ENV, cwd=str(short_tmp))  # `serve`'s validation alone passes


def test_check_host_takes_an_existing_group_and_a_gid(short_tmp: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    for literal in (f'"{group}"', "4000000000"):
        toml = host_toml(socket_path="run/c.sock", ingest=f"socket_group = {literal}")
        write(short_tmp / "config.toml", toml)
        load_config("config.toml", environ=ENV, cwd=str(short_tmp), check_host=True)


def test_check_host_refuses_a_spool_dir_that_is_a_file(short_tmp: Path) -> None:
    (short_tmp / "spool").write_text("not a directory")
    toml = host_toml()
    assert host_problems(short_tmp, toml) == [
        f"config.toml: spool_dir = '{short_tmp}/spool': exists and is not a directory"
    ]


def test_check_host_refuses_a_spool_dir_under_a_file(short_tmp: Path) -> None:
    """A path under a regular file cannot be created, for root too (permission bits stop nobody there)."""
    (short_tmp / "file").write_text("")
    toml = host_toml(spool_dir="file/spool")
    assert host_problems(short_tmp, toml) == [
        f"config.toml: spool_dir = '{short_tmp}/file/spool': cannot be created: {short_tmp}/file is not a directory"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the permission bits say")
def test_check_host_refuses_a_spool_dir_not_writable(short_tmp: Path) -> None:
    (short_tmp / "spool").mkdir(mode=0o555)
    (short_tmp / "ro").mkdir(mode=0o555)
    try:
        assert host_problems(short_tmp, host_toml()) == [
            f"config.toml: spool_dir = '{short_tmp}/spool': is not writable by this user (uid {os.geteuid()})"
        ]
        assert host_problems(short_tmp, host_toml(spool_dir="ro/spool")) == [
            f"config.toml: spool_dir = '{short_tmp}/ro/spool': cannot be created: {short_tmp}/ro is not writable"
            f" by this user (uid {os.geteuid()})"
        ]
    finally:
        (short_tmp / "spool").chmod(0o755)
        (short_tmp / "ro").chmod(0o755)


def test_check_host_refuses_a_socket_directory_that_cannot_be_created(short_tmp: Path) -> None:
    (short_tmp / "file").write_text("")
    toml = host_toml(socket_path="file/run/c.sock")
    assert host_problems(short_tmp, toml) == [
        f"config.toml: socket_path = '{short_tmp}/file/run/c.sock': its directory {short_tmp}/file/run"
        f" cannot be created: {short_tmp}/file is not a directory"
    ]
    toml = host_toml(socket_path="file/c.sock")
    assert host_problems(short_tmp, toml) == [
        f"config.toml: socket_path = '{short_tmp}/file/c.sock': its directory {short_tmp}/file"
        " exists and is not a directory"
    ]


def test_check_host_refuses_a_socket_path_that_is_no_socket(short_tmp: Path) -> None:
    (short_tmp / "c.sock").write_text("")
    toml = host_toml()
    assert host_problems(short_tmp, toml) == [
        f"config.toml: socket_path = '{short_tmp}/c.sock': exists and is not a socket:"
        " the daemon refuses to replace it"
    ]


def test_check_host_refuses_a_local_destination_that_cannot_be_created(short_tmp: Path) -> None:
    (short_tmp / "file").write_text("")
    toml = host_toml().replace('"s3://my-bucket/capture"', '"file/out"')
    assert host_problems(short_tmp, toml) == [
        f"config.toml: {DEST} = 'file/out': the directory cannot be created: {short_tmp}/file is not a directory"
    ]


def test_captured_check_reports_host_problems_with_the_others(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Step by step: a config with a bad sampling percentage, a spool path that is a file and a socket
    directory under a file. `captured check` prints all three like any config problem and exits 2,
    creating nothing; `captured serve`'s validation alone sees only the percentage."""
    (short_tmp / "file").write_text("")
    toml = host_toml(socket_path="file/run/c.sock", spool_dir="file").replace(
        "InitialSamplingPercentage = 20", "InitialSamplingPercentage = 101"
    )
    config = write(short_tmp / "config.toml", toml)
    assert main(["check", "--config", config]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" = ")[0] for line in lines] == [
        f"captured: invalid configuration: {config}: socket_path",
        f"captured: invalid configuration: {config}: spool_dir",
        f"captured: invalid configuration: {config}: {PCT}",
    ]
    assert "cannot be created" in lines[0] and "exists and is not a directory" in lines[1]
    assert sorted(p.name for p in short_tmp.iterdir()) == ["config.toml", "file"]
    with pytest.raises(ConfigError) as info:
        load_config(config, environ=ENV)
    assert [p.split(" = ")[0] for p in info.value.problems] == [f"{config}: {PCT}"]


def test_captured_check_passes_a_host_that_can_serve(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(short_tmp / "config.toml", host_toml(socket_path="run/c.sock"))
    assert main(["check", "--config", config]) == 0
    out = capsys.readouterr()
    assert f'spool_dir = "{short_tmp}/spool"' in out.out and "configuration OK" in out.err
    assert not (short_tmp / "spool").exists()
