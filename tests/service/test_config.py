from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ServerConfig

# -- ServerConfig -----------------------------------------------------------------------------------


def test_server_defaults():
    config = ServerConfig.from_env({})
    assert config == ServerConfig()
    assert (config.address, config.metrics_port, config.stacks) == ("[::]:50051", 9090, ())
    assert config.max_message_bytes == 64 * 1024 * 1024 and config.request_timeout_s == 300
    assert not config.tls_enabled and not config.auth_enabled and config.auth_exempt_health and config.self_check


def test_server_env_is_parsed_and_flags_win():
    env = {
        "FEATUREWIRE_PORT": "6000", "FEATUREWIRE_METRICS_PORT": "0", "FEATUREWIRE_STACKS": "/a:/b,~/c",
        "FEATUREWIRE_MAX_NEW_TOKENS": "64", "FEATUREWIRE_REQUEST_TIMEOUT_S": "2.5", "FEATUREWIRE_SELF_CHECK": "no",
        "FEATUREWIRE_AUTH_TOKEN": "s3cret", "FEATUREWIRE_LOG_LEVEL": "debug", "FEATUREWIRE_MODEL": "ignored-here",
    }
    config = ServerConfig.from_env(env, port=7000, max_new_tokens=None, stacks=None)
    assert (config.port, config.metrics_port, config.max_new_tokens) == (7000, 0, 64)
    assert config.stacks == (Path("/a"), Path("/b"), Path.home() / "c")
    assert (config.request_timeout_s, config.self_check, config.log_level) == (2.5, False, "DEBUG")
    assert config.auth_enabled and "s3cret" not in repr(config)
    assert ServerConfig.from_env(env, stacks=["x"]).stacks == (Path("x"),)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FEATUREWIRE_PORT": "http"}, "FEATUREWIRE_PORT must be an integer"),
        ({"FEATUREWIRE_PORT": "70000"}, r"FEATUREWIRE_PORT: port must be in \[0, 65535\]"),
        ({"FEATUREWIRE_QUEUE_SIZE": "0"}, "FEATUREWIRE_QUEUE_SIZE: queue_size must be at least 1"),
        ({"FEATUREWIRE_DRAIN_GRACE_S": "nan"}, "FEATUREWIRE_DRAIN_GRACE_S must be finite"),
        ({"FEATUREWIRE_REQUEST_TIMEOUT_S": "soon"}, "FEATUREWIRE_REQUEST_TIMEOUT_S must be a number"),
        ({"FEATUREWIRE_SELF_CHECK": "maybe"}, "FEATUREWIRE_SELF_CHECK must be true/false"),
        ({"FEATUREWIRE_TLS_CERT": "/c.pem"}, "tls_cert and tls_key must be given together"),
        ({"FEATUREWIRE_LOG_LEVEL": "loud"}, "log_level must be one of"),
        ({"FEATUREWIRE_AUTH_TOKEN": "a b"}, "auth_token must be printable ASCII"),
    ],
)
def test_server_env_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_env(env)


def test_server_validation_without_env():
    with pytest.raises(ValueError, match="max_message_bytes"):
        ServerConfig(max_message_bytes=2**31)
    with pytest.raises(ValueError, match="^request_timeout_s"):
        ServerConfig(request_timeout_s=0)
    with pytest.raises(ValueError, match="bad server config"):
        ServerConfig.from_env({}, no_such_flag=1)
    config = ServerConfig(tls_cert="c.pem", tls_key="k.pem", stacks=["s"])  # type: ignore[arg-type]
    assert config.tls_enabled and config.tls_cert == Path("c.pem") and config.stacks == (Path("s"),)
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


def test_auth_token_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert ServerConfig.from_env({"FEATUREWIRE_AUTH_TOKEN_FILE": str(token_file)}).auth_token == "from-file"
    assert ServerConfig.from_env({}, auth_token_file=token_file).auth_token == "from-file"
    # a flag wins over the environment, in either form
    env = {"FEATUREWIRE_AUTH_TOKEN": "env-token"}
    assert ServerConfig.from_env(env, auth_token_file=str(token_file)).auth_token == "from-file"
    file_env = {"FEATUREWIRE_AUTH_TOKEN_FILE": str(token_file)}
    assert ServerConfig.from_env(file_env, auth_token="flag").auth_token == "flag"
    with pytest.raises(ValueError, match="not both"):
        ServerConfig.from_env({**env, "FEATUREWIRE_AUTH_TOKEN_FILE": str(token_file)})
    with pytest.raises(ValueError, match="cannot be read"):
        ServerConfig.from_env({"FEATUREWIRE_AUTH_TOKEN_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ServerConfig.from_env({"FEATUREWIRE_AUTH_TOKEN_FILE": str(tmp_path / "empty")})
