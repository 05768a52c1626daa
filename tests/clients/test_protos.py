"""The API definition (protos/featurewire/v1) and the generated code committed in the client package.

- the committed code is exactly what `make protos` produces from the .proto files today;
- every enum starts with `<ENUM_NAME>_UNSPECIFIED = 0` and prefixes its values with its name;
- every message, field, oneof, enum, enum value, service and method carries a comment;
- the service has the ten RPCs with the documented streaming kinds;
- the dependency floors admit no grpcio/protobuf older than what the generated code checks at import.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "featurewire" / "v1"
CLIENT_ROOT = ROOT / "clients" / "python"
GENERATED = CLIENT_ROOT / "featurewire" / "v1"
SERVICE_PROTO = "featurewire/v1/featurewire.proto"
HAND_WRITTEN = {"__init__.py"}

# name -> (client streaming, server streaming)
RPCS = {
    "GetServerInfo": (False, False),
    "ListStacks": (False, False),
    "GetFeature": (False, False),
    "SearchFeatures": (False, False),
    "ListFeatures": (False, False),
    "Tokenize": (False, False),
    "Decompose": (False, True),
    "Generate": (False, True),
    "Score": (False, False),
    "EncodeActivations": (True, True),
}

# FileDescriptorProto / DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto field numbers,
# as used in SourceCodeInfo.Location.path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))


def protoc(*args: str) -> None:
    """Run grpc_tools.protoc as `make protos` does; fail with its stderr."""
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", *args],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"


def generate_into(out: Path) -> None:
    """The two protoc invocations of the Makefile's `protos` target, into `out`."""
    files = [str(PROTO_ROOT / f) for f in proto_files()]
    protoc(f"--python_out={out}", f"--pyi_out={out}", *files)
    protoc(f"--grpc_python_out={out}", str(PROTO_ROOT / SERVICE_PROTO))


def generated_files(root: Path) -> dict[str, bytes]:
    directory = root / "featurewire" / "v1"
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in HAND_WRITTEN and p.suffix in {".py", ".pyi"}
    }


@pytest.fixture(scope="module")
def file_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("descriptors") / "api.binpb"
    protoc("--include_source_info", f"--descriptor_set_out={out}", *(str(PROTO_ROOT / f) for f in proto_files()))
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_committed_generated_code_is_current(tmp_path: Path):
    generate_into(tmp_path)
    fresh, committed = generated_files(tmp_path), generated_files(CLIENT_ROOT)
    hint = "the generated code in clients/python/featurewire/v1 is stale: run `make protos` and commit the result"
    assert sorted(committed) == sorted(fresh), f"{hint} (files differ: {sorted(committed)} vs {sorted(fresh)})"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{hint} (content differs: {stale})"


def screaming_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def all_enums(file_set: descriptor_pb2.FileDescriptorSet):
    def walk(messages):
        for message in messages:
            yield from message.enum_type
            yield from walk(message.nested_type)

    for f in file_set.file:
        yield from f.enum_type
        yield from walk(f.message_type)


def test_every_enum_starts_with_unspecified_zero(file_set):
    enums = list(all_enums(file_set))
    assert enums
    for enum in enums:
        prefix = screaming_snake(enum.name)
        first = enum.value[0]
        assert (first.name, first.number) == (f"{prefix}_UNSPECIFIED", 0), f"{enum.name} starts with {first.name}"
        for value in enum.value:
            assert value.name.startswith(prefix + "_"), f"{enum.name}.{value.name} lacks the prefix {prefix}_"


def commentable_paths(f: descriptor_pb2.FileDescriptorProto):
    """(path, label) of every element that must carry a comment."""

    def message_paths(message, path, label):
        if message.options.map_entry:  # synthesized for map<> fields; the field carries the comment
            return
        yield path, label
        for i, field in enumerate(message.field):
            yield [*path, MSG_FIELD, i], f"{label}.{field.name}"
        for i, oneof in enumerate(message.oneof_decl):
            members = [fd for fd in message.field if fd.HasField("oneof_index") and fd.oneof_index == i]
            if not all(fd.proto3_optional for fd in members):  # skip the synthetic oneofs of `optional`
                yield [*path, MSG_ONEOF, i], f"{label}.{oneof.name}"
        for i, nested in enumerate(message.nested_type):
            yield from message_paths(nested, [*path, MSG_NESTED, i], f"{label}.{nested.name}")
        for i, enum in enumerate(message.enum_type):
            yield from enum_paths(enum, [*path, MSG_ENUM, i], f"{label}.{enum.name}")

    def enum_paths(enum, path, label):
        yield path, label
        for i, value in enumerate(enum.value):
            yield [*path, ENUM_VALUE, i], f"{label}.{value.name}"

    for i, message in enumerate(f.message_type):
        yield from message_paths(message, [FILE_MESSAGE, i], message.name)
    for i, enum in enumerate(f.enum_type):
        yield from enum_paths(enum, [FILE_ENUM, i], enum.name)
    for i, service in enumerate(f.service):
        yield [FILE_SERVICE, i], service.name
        for j, method in enumerate(service.method):
            yield [FILE_SERVICE, i, SERVICE_METHOD, j], f"{service.name}.{method.name}"


def test_every_element_is_commented(file_set):
    missing = []
    for f in file_set.file:
        comments = {
            tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip()
            for loc in f.source_code_info.location
        }
        missing += [f"{f.name}: {label}" for path, label in commentable_paths(f) if not comments.get(tuple(path))]
    assert not missing, "uncommented elements (say what it is, its units and allowed range):\n" + "\n".join(missing)


def test_service_has_the_ten_rpcs_with_their_streaming_kinds(file_set):
    services = [(f.package, s) for f in file_set.file for s in f.service]
    assert [(package, s.name) for package, s in services] == [("featurewire.v1", "Featurewire")]
    methods = {m.name: m for m in services[0][1].method}
    assert {name: (m.client_streaming, m.server_streaming) for name, m in methods.items()} == RPCS
    for name, method in methods.items():
        assert method.input_type == f".featurewire.v1.{name}Request", name
        assert method.output_type == f".featurewire.v1.{name}Response", name


def test_every_file_is_in_package_featurewire_v1_with_language_options(file_set):
    for f in file_set.file:
        assert f.package == "featurewire.v1", f.name
        assert f.syntax == "proto3", f.name
        assert f.options.go_package and f.options.java_package and f.options.java_multiple_files, f.name


def _floor(requirements: list[str], name: str) -> tuple[int, ...]:
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([0-9.]+)(,.*)?", requirement.strip())
        if match:
            return tuple(int(part) for part in match.group(1).split("."))
    raise AssertionError(f"no `{name}>=` floor in {requirements}")


def _generated_versions() -> tuple[tuple[int, ...], tuple[int, ...]]:
    grpc_text = (GENERATED / "featurewire_pb2_grpc.py").read_text()
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_text)
    pb_text = (GENERATED / "featurewire_pb2.py").read_text()
    pb_version = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
                           r"(\d+),\s*(\d+),\s*(\d+),", pb_text)
    assert grpc_version and pb_version, "cannot read the versions the generated code checks"
    return tuple(int(p) for p in grpc_version.group(1).split(".")), tuple(int(p) for p in pb_version.groups())


@pytest.mark.parametrize("pyproject", [CLIENT_ROOT / "pyproject.toml", ROOT / "pyproject.toml"],
                         ids=["client", "root"])
def test_dependency_floors_satisfy_the_generated_code(pyproject: Path):
    grpc_needed, protobuf_needed = _generated_versions()
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert _floor(requirements, "grpcio") >= grpc_needed, f"{pyproject}: grpcio floor below {grpc_needed}"
    assert _floor(requirements, "protobuf") >= protobuf_needed, f"{pyproject}: protobuf floor below {protobuf_needed}"
    protobuf_spec = next(r for r in requirements if r.startswith("protobuf"))
    major = protobuf_needed[0]
    assert f"<{major + 1}" in protobuf_spec, f"{pyproject}: protobuf must stay on major {major}"


def test_generated_modules_import_and_build_messages():
    code = (
        "from featurewire.v1 import featurewire_pb2 as pb, featurewire_pb2_grpc as rpc, types_pb2 as t\n"
        "codes = t.StageCodes(stage=1, ids=[3, 7], values=[2.5, -1.0], l0=9)\n"
        "event = pb.GenerateResponse(token=pb.TokenEvent(branch=t.BRANCH_STEERED, features=[codes]))\n"
        "assert pb.GenerateResponse.FromString(event.SerializeToString()) == event\n"
        "assert not codes.HasField('error_norm')\n"
        "assert rpc.FeaturewireStub and rpc.FeaturewireServicer and rpc.add_FeaturewireServicer_to_server\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CLIENT_ROOT)
    assert result.returncode == 0, result.stderr
