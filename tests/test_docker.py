"""The docker files, checked with what runs without a Docker daemon: the compose file parsed with
PyYAML and interpolated as compose does, its server and worker commands parsed by the real
`mlflow server`, `mlflow db upgrade` and `leukemia search` option parsers, the Dockerfiles read
instruction by instruction, and .dockerignore matched against the checkout. `docker compose
config` runs too where the compose plugin is installed."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement

from .conftest import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
PROJECT_DOCKERFILE = DOCKER / "Dockerfile"
SERVER_DOCKERFILE = DOCKER / "mlflow-server.Dockerfile"
K8S_WORKERS = DOCKER / "search-workers.k8s.yaml"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY")
# scheme://user:password@host: a credential written into a URL
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# --- reading the files --------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def filled_env() -> dict[str, str]:
    """.env.example as a user fills it in: every credential set, the rest as it comes."""
    env = read_env_file(ENV_EXAMPLE)
    for name in filter(SECRET_NAME.search, env):
        env[name] = f"test-{name.lower()}-0123456789"
    return env


def strings(document):
    """Every string in a parsed document: what compose interpolates (comments are not)."""
    if isinstance(document, dict):
        return [s for value in document.values() for s in strings(value)]
    if isinstance(document, list):
        return [s for value in document for s in strings(value)]
    return [document] if isinstance(document, str) else []


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of ``${NAME}``, ``${NAME:-default}``, ``${NAME:?message}`` and
    ``$$`` through a parsed document."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match):
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        current = env.get(name)
        if op in (":?", "?") and not current:
            raise KeyError(f"{name}: {arg}")
        if (op == ":-" and not current) or (op == "-" and current is None):
            return arg
        return current or ""

    return VARIABLE.sub(substitute, value)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; heredoc bodies are skipped."""
    instructions, pending, heredoc_end = [], "", None
    for line in path.read_text().splitlines():
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        if heredoc := re.search(r"<<-?'?(\w+)'?", arguments):
            heredoc_end = heredoc.group(1)
        pending = ""
    return instructions


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match, plus ``**`` for any folders) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context: a pattern that matches a
    folder keeps out everything under it; a later ``!pattern`` lets a path back in."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
    excluded = False
    for pattern in patterns:
        regex = dockerignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(parent) for parent in parents):
            excluded = not pattern.startswith("!")
    return excluded


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(raw) -> dict:
    return interpolate(raw["services"], filled_env())


def option(command: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in a command list."""
    for i, word in enumerate(command):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return command[i + 1]
    raise AssertionError(f"{name} not in {command}")


# --- the stack ----------------------------------------------------------------------------------


def test_services_and_what_starts_by_default(raw):
    services = raw["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"postgres", "storage", "create-bucket", "mlflow-db-upgrade", "mlflow"}
    assert services["trainer"]["profiles"] == ["train"]
    assert services["search-worker"]["profiles"] == ["search"]
    assert services["search-worker-gpu"]["profiles"] == ["gpu"]
    assert services["optuna-dashboard"]["profiles"] == ["dashboard"]


def test_start_order(services):
    conditions = {
        name: {dep: spec["condition"] for dep, spec in service.get("depends_on", {}).items()}
        for name, service in services.items()
    }
    assert conditions["mlflow"] == {
        "postgres": "service_healthy",
        "storage": "service_healthy",
        "create-bucket": "service_completed_successfully",
        "mlflow-db-upgrade": "service_completed_successfully",
    }
    assert conditions["mlflow-db-upgrade"] == {"postgres": "service_healthy"}
    assert conditions["create-bucket"] == {"storage": "service_healthy"}
    for worker in ("search-worker", "search-worker-gpu"):
        assert conditions[worker] == {"mlflow": "service_healthy", "postgres": "service_healthy"}
    assert conditions["trainer"] == {"mlflow": "service_healthy"}
    for deps in conditions.values():
        for dep, condition in deps.items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} is waited for but has no check"
            else:  # a one-shot: it must end, and not be restarted
                assert services[dep].get("restart") == "no", dep
                assert not services[dep].get("profiles"), f"{dep} must start with the stack"


def test_postgres(raw, services):
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:1[56](-\w+)?", postgres["image"]), postgres["image"]
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    assert "pgdata" in raw["volumes"]
    check = " ".join(postgres["healthcheck"]["test"])
    # Over TCP: the image's init-time server listens on the socket only.
    assert "pg_isready" in check and "-h 127.0.0.1" in check
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    scripts = sorted((DOCKER / "postgres-init").glob("*.sh"))
    assert scripts and all(os.access(script, os.X_OK) for script in scripts)
    sql = " ".join(script.read_text() for script in scripts)
    for database in ("mlflow", "optuna"):
        assert re.search(rf"CREATE DATABASE {database} OWNER {database};", sql)
        assert re.search(rf"CREATE ROLE {database} LOGIN PASSWORD :'{database}_password';", sql)
        name = f"{database.upper()}_DB_PASSWORD"
        assert postgres["environment"][name] == filled_env()[name]


def test_object_store_and_bucket(raw, services):
    image = raw["services"]["storage"]["image"]
    tag = image.partition(":")[2]
    assert tag and tag != "latest" and re.search(r"\d", tag), f"pin the store's tag: {image}"
    assert "artifacts" in raw["volumes"] and "artifacts:/data" in services["storage"]["volumes"]
    assert "ports" not in services["storage"], "only the server talks to the store"
    bucket = services["create-bucket"]["environment"]["S3_BUCKET"]
    script = " ".join(services["create-bucket"]["command"])
    assert "head-bucket" in script and "create-bucket" in script and "$S3_BUCKET" in script
    assert "http://storage:9000" in script
    server = services["mlflow"]
    assert option(server["command"], "--artifacts-destination") == f"s3://{bucket}"
    assert server["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://storage:9000"


def test_server_command_parses_as_mlflow_server(services):
    import mlflow.cli
    import mlflow.db
    from mlflow.server.security_utils import is_allowed_host_header

    server = services["mlflow"]
    assert server["build"]["dockerfile"] == "docker/mlflow-server.Dockerfile"
    assert server["build"]["context"] == ".."  # the root .dockerignore keeps docker/.env out
    assert server["command"][:2] == ["mlflow", "server"]
    params = mlflow.cli.server.make_context("server", server["command"][2:]).params
    backend = urlparse(params["backend_store_uri"])
    # The driver the image installs: plain postgresql:// means psycopg 3 under SQLAlchemy 2.1.
    scheme = ("postgresql+psycopg2", "postgres", "/mlflow")
    assert (backend.scheme, backend.hostname, backend.path) == scheme
    assert backend.password is None and server["environment"]["PGPASSWORD"]
    assert params["serve_artifacts"] and params["artifacts_destination"].startswith("s3://")
    assert params["host"] == "0.0.0.0"

    # The containers' tracking URI names the server's service and port, and the server takes
    # that Host header (MLflow 3.x answers 403 "Invalid Host header" otherwise).
    allowed = params["allowed_hosts"].split(",")
    for client in ("trainer", "search-worker", "search-worker-gpu"):
        uri = urlparse(services[client]["environment"]["MLFLOW_TRACKING_URI"])
        assert uri.hostname in services and services[uri.hostname] is server
        assert uri.port == params["port"]
        assert is_allowed_host_header(allowed, uri.netloc), uri.netloc
    port = server["ports"][0].split(":")[1]
    for host in (f"localhost:{port}", "localhost:15000", "127.0.0.1:5000", "localhost"):
        assert is_allowed_host_header(allowed, host), host  # health check, SSH tunnels
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    assert "/health" in " ".join(server["healthcheck"]["test"])

    upgrade = services["mlflow-db-upgrade"]
    assert upgrade["command"][:3] == ["mlflow", "db", "upgrade"]
    url = mlflow.db.upgrade.make_context("upgrade", upgrade["command"][3:]).params["url"]
    assert url == params["backend_store_uri"]
    assert upgrade["environment"]["PGPASSWORD"] == server["environment"]["PGPASSWORD"]
    assert upgrade["image"] == server["image"] and upgrade["build"] == server["build"]


def test_worker_command_parses_as_leukemia_search(services):
    from leukemia.cli_search import search_command

    for name in ("search-worker", "search-worker-gpu"):
        worker = services[name]
        assert worker["command"][:2] == ["leukemia", "search"]
        params = search_command.make_context("search", worker["command"][2:]).params
        storage = urlparse(params["storage"])
        assert (storage.scheme, storage.hostname, storage.path) == (
            "postgresql+psycopg2",
            "postgres",
            "/optuna",
        )
        assert storage.username == "optuna" and storage.password is None
        assert worker["environment"]["PGPASSWORD"] == filled_env()["OPTUNA_DB_PASSWORD"]
        assert (REPO / params["space"]).is_file()
        assert params["study_name"] is None and params["max_trials"] is None  # empty: unset
        assert params["out_dir"] == "processed"
    dashboard = services["optuna-dashboard"]
    assert dashboard["command"] == [option(services["search-worker"]["command"], "--storage")]


def test_kubernetes_search_workers_are_the_compose_worker_as_an_indexed_job(services):
    """docker/search-workers.k8s.yaml, parsed: an Indexed Job whose pods run the compose
    worker's command (parsed by the real `leukemia search`) on the same storage, with the
    password from a Secret, the project image's non-root user and the shared store mounted."""
    from leukemia.cli_search import search_command

    (job,) = list(yaml.safe_load_all(K8S_WORKERS.read_text()))
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] > 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "leukemia:local"  # compose's ${LEUKEMIA_IMAGE:-leukemia:local}
    assert container["command"][:2] == ["leukemia", "search"]
    params = search_command.make_context("search", container["command"][2:]).params
    compose = option(services["search-worker"]["command"], "--storage")
    assert params["storage"] == compose and urlparse(compose).password is None
    assert (REPO / params["space"]).is_file() and params["study_name"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    assert "value" not in env["PGPASSWORD"]
    assert urlparse(env["MLFLOW_TRACKING_URI"]["value"]).scheme == "http"
    (mount,) = container["volumeMounts"]
    for folder in (params["data_dir"], params["out_dir"]):
        assert Path(folder).is_relative_to(mount["mountPath"]), folder
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"] and volume["persistentVolumeClaim"]["claimName"]
    user = [line for line in PROJECT_DOCKERFILE.read_text().splitlines() if line.startswith("USER")]
    assert user and user[-1].split()[1].split(":")[0].isdigit()  # runAsNonRoot needs a uid
    assert not URL_WITH_PASSWORD.search(K8S_WORKERS.read_text())


def test_trainer_runs_the_project(services):
    trainer = services["trainer"]
    assert trainer["command"][:3] == ["mlflow", "run", "."]
    assert option(trainer["command"], "--env-manager") == "local"


def test_project_services_scale_and_mount(raw, services):
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: a fixed name prevents --scale"
    for name in ("trainer", "search-worker", "search-worker-gpu"):
        service = services[name]
        assert "ports" not in service, f"{name}: a published port prevents --scale"
        assert service["build"]["context"] == ".." and service["build"]["dockerfile"] == (
            "docker/Dockerfile"
        )
        volumes = service["volumes"]
        assert [v for v in volumes if v.endswith(":/data:ro")], f"{name}: data read-only"
        assert "processed:/app/processed" in volumes and "cache:/home/leukemia/.cache" in volumes
        assert service["init"] is True
    assert {"processed", "cache"} <= set(raw["volumes"])
    gpu = services["search-worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "cuda" in gpu["build"]["args"]["BASE_IMAGE"]


def test_published_ports_bind_to_localhost(services):
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip = port["host_ip"] if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this host"
            assert isinstance(port, dict) or port.count(":") == 2, port
            published += 1
    assert published == 3  # mlflow, postgres, optuna-dashboard


# --- credentials --------------------------------------------------------------------------------


def test_credentials_are_references_only(raw):
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), (
                    f"{name}.{key} must be a required ${{VAR:?...}} reference, got {value!r}"
                )
    for path in (COMPOSE, ENV_EXAMPLE, PROJECT_DOCKERFILE, SERVER_DOCKERFILE):
        assert not URL_WITH_PASSWORD.search(path.read_text()), f"a password in a URL in {path}"
    example = read_env_file(ENV_EXAMPLE)
    secrets = {name: value for name, value in example.items() if SECRET_NAME.search(name)}
    assert set(secrets) == {
        "POSTGRES_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "OPTUNA_DB_PASSWORD",
        "S3_ACCESS_KEY",
        "S3_SECRET_KEY",
    }
    assert all(value == "" for value in secrets.values()), f"placeholders only: {secrets}"
    for path in (PROJECT_DOCKERFILE, SERVER_DOCKERFILE):
        for instruction, arguments in dockerfile_instructions(path):
            if instruction in ("ARG", "ENV"):
                names = re.findall(r"(\w+)=", arguments) or [arguments.split()[0]]
                assert not [n for n in names if SECRET_NAME.search(n)], (path, arguments)


def test_env_example_names_every_variable(raw):
    text = "\n".join(strings(raw))
    referenced = {m["name"]: m["op"] for m in VARIABLE.finditer(text) if m["name"]}
    example = read_env_file(ENV_EXAMPLE)
    required = {name for name, op in referenced.items() if not op or "?" in op}
    assert required <= set(example), f"missing from .env.example: {required - set(example)}"
    assert set(example) <= set(referenced), f"unused: {set(example) - set(referenced)}"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(raw["services"], {**filled_env(), "POSTGRES_PASSWORD": ""})


# --- one MLflow release everywhere --------------------------------------------------------------


def arg_default(path: Path, name: str) -> str:
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "ARG" and arguments.startswith(f"{name}="):
            return arguments.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}= in {path}")


def install_requires() -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return [Requirement(line) for line in config["options"]["install_requires"].split()]


def test_one_mlflow_version(raw, services):
    """One exact MLflow release for the server, the schema upgrade and the project image, inside
    setup.cfg's range. (Not compared with the installed MLflow: a fresh install may take a newer
    release the range allows.)"""
    version = raw["x-mlflow-version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"pin one release, got {version!r}"
    (mlflow,) = [r for r in install_requires() if r.name == "mlflow"]
    assert mlflow.specifier.contains(version), f"{version} outside setup.cfg's {mlflow}"
    assert arg_default(PROJECT_DOCKERFILE, "MLFLOW_VERSION") == version
    assert arg_default(SERVER_DOCKERFILE, "MLFLOW_VERSION") == version
    for name in ("mlflow", "mlflow-db-upgrade", "trainer", "search-worker", "search-worker-gpu"):
        assert services[name]["build"]["args"]["MLFLOW_VERSION"] == version, name


# --- the Dockerfiles ----------------------------------------------------------------------------


def test_project_dockerfile():
    instructions = dockerfile_instructions(PROJECT_DOCKERFILE)
    (first_from,) = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert instructions[first_from][1] == "${BASE_IMAGE}"
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in instructions[:first_from]
    users = [arguments for word, arguments in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    runs = [arguments for word, arguments in instructions if word == "RUN"]
    assert [r for r in runs if re.search(r"pip install -e /app$", r)], "install the package"
    assert [r for r in runs if "-r /tmp/build/requirements.txt" in r and "MLFLOW_VERSION" in r]
    assert [r for r in runs if '--index-url "${TORCH_INDEX_URL}"' in r]
    assert runs[-1].startswith("leukemia --help"), "smoke test as the final user"
    assert ("COPY", "setup.cfg /tmp/build/setup.cfg") in instructions


def test_project_dockerfile_reads_setup_cfg(tmp_path):
    """The build's own script, run here: its requirement files are setup.cfg's ranges."""
    text = PROJECT_DOCKERFILE.read_text()
    script = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.DOTALL).group(1)
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    exec(script.replace("/tmp/build", str(tmp_path)), {})
    written = (tmp_path / "requirements.txt").read_text().split()
    assert [Requirement(line) for line in written] == install_requires()
    torch = (tmp_path / "torch.txt").read_text().split()
    assert [Requirement(line).name for line in torch] == ["torch", "torchvision"]


def test_server_dockerfile():
    instructions = dockerfile_instructions(SERVER_DOCKERFILE)
    runs = " ".join(arguments for word, arguments in instructions if word == "RUN")
    for package in ('"mlflow==${MLFLOW_VERSION}"', "psycopg2-binary", "boto3"):
        assert "pip install" in runs and package in runs, package
    users = [arguments for word, arguments in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_dockerignore():
    for path in (
        "data/ALL/Benign/x.jpg",
        "processed/abc/manifest.json",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/a",
        ".venv/bin/python",
        "searches/optuna.journal",
        "cache/x",
        "docker/.env",
        ".env",
        ".git/config",
        "leukemia/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignored(path), f"{path} would reach the image"
    for path in ("leukemia/cli.py", "MLproject", "setup.cfg", "README.md", ".git/HEAD"):
        assert not dockerignored(path), f"{path} is needed in the image"
    if (REPO / ".git").exists():  # the image's checkout is clean when the build's is
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert not [path for path in tracked if dockerignored(path)]


# --- docker compose itself, where it is installed -----------------------------------------------


def compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    found = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=10)
    return found.returncode == 0


@pytest.mark.skipif(not compose_plugin(), reason="the docker compose plugin is not installed here")
def test_docker_compose_config(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in filled_env().items()))
    command = ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(env_file)]
    profiles = [f"--profile={name}" for name in ("train", "search", "gpu", "dashboard")]
    environ = {k: v for k, v in os.environ.items() if k not in filled_env()}
    done = subprocess.run(
        [*command, *profiles, "config", "--quiet"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    env_file.write_text("")
    missing = subprocess.run(
        [*command, "config", "--quiet"], capture_output=True, text=True, env=environ, timeout=30
    )
    assert missing.returncode != 0 and "docker/.env" in missing.stderr
