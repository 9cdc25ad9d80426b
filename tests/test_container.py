"""The container image, reproduced without a container engine (none runs here or in CI).

The Dockerfile is read, not copied: its final stage's USER, WORKDIR, VOLUME, EXPOSE, ENV,
HEALTHCHECK, ENTRYPOINT and CMD drive the test. The project is pip-installed (not editable) into
a fresh virtual environment; the dependencies come from the environment running the tests (a
.pth file stands in for the image's site-packages, so nothing is downloaded). The image's paths
(/etc/relay, /var/lib/relay) are laid out under a temporary root, the entry command runs as an
unprivileged user (uid 65534 when the tests run as root, as in CI), and the health check is the
Dockerfile's own command, run as Docker would run it. SIGTERM then stops the relay cleanly.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from relay.config import CredentialKind, loads

CHECKOUT = Path(__file__).resolve().parents[1]
DOCKERFILE = CHECKOUT / "Dockerfile"
NOBODY = 65534
START_LIMIT = 20.0  # seconds for `relay serve` to answer its health check


@dataclass
class Image:
    """What the Dockerfile's final stage says about the running container."""

    user: str = ""
    workdir: str = "/"
    volumes: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stopsignal: str = ""
    healthcheck: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def parse_image(text: str) -> Image:
    steps = instructions(text)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    image = Image()
    for word, rest in steps[last_from + 1 :]:
        if word == "USER":
            image.user = rest
        elif word == "WORKDIR":
            image.workdir = rest
        elif word == "VOLUME":
            image.volumes += json.loads(rest)
        elif word == "EXPOSE":
            image.expose += rest.split()
        elif word == "ENV":
            image.env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
        elif word == "STOPSIGNAL":
            image.stopsignal = rest
        elif word == "HEALTHCHECK":
            image.healthcheck = json.loads(rest.split(" CMD ", 1)[1])
        elif word == "ENTRYPOINT":
            image.entrypoint = json.loads(rest)
        elif word == "CMD":
            image.cmd = json.loads(rest)
    return image


@pytest.fixture(scope="module")
def image() -> Image:
    return parse_image(DOCKERFILE.read_text())


def test_the_dockerfile_says_what_operators_rely_on(image: Image) -> None:
    uid, gid = image.user.split(":")
    assert int(uid) != 0 and int(gid) != 0  # numeric: runAsNonRoot can check it
    assert image.volumes == ["/var/lib/relay/spool", "/etc/relay"]
    assert image.expose == ["2525", "9025"]
    assert image.stopsignal == "SIGTERM"
    assert image.env["RELAY_HEALTH_URL"] == "http://127.0.0.1:9025/healthz"
    assert image.healthcheck[:2] == ["python", "-c"]
    assert image.entrypoint + image.cmd == ["relay", "serve", "--config", "/etc/relay/relay.yaml"]


def test_instructions_join_continuations_and_skip_comments() -> None:
    text = "FROM a AS b\n# note\nRUN x \\\n  # inside\n  && y\nUSER 1:1\n"
    assert instructions(text) == [("FROM", "a AS b"), ("RUN", "x    && y"), ("USER", "1:1")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_user(uid: int) -> dict[str, object]:
    """subprocess arguments that run a child as `uid` (nothing when we are not root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": uid, "group": uid, "extra_groups": []}


def interpreter_for(uid: int) -> str | None:
    """A Python of our version that `uid` may run (the image's is /usr/local/bin/python)."""
    candidates = [sys._base_executable, "/usr/local/bin/python3", "/usr/bin/python3"]  # type: ignore[attr-defined]
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for path in dict.fromkeys(candidates):
        try:
            done = subprocess.run(
                [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd="/",
                **as_user(uid),  # type: ignore[arg-type]
            )
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip() == want:
            return path
    return None


@pytest.fixture
def root() -> Iterator[Path]:
    """A temporary root the unprivileged user can reach (pytest's tmp_path is private)."""
    path = Path(tempfile.mkdtemp(prefix="relay-image-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def build(root: Path, uid: int) -> Path:
    """A venv with the project installed as the image installs it; its bin/ directory."""
    python = interpreter_for(uid)
    if python is None:
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that uid {uid} can run")
    venv = root / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheels = root / "wheels"  # as the Dockerfile's build stage: a wheel, then installed
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(CHECKOUT)],
        check=True,
        timeout=120,
    )
    (wheel,) = wheels.glob("relay-*.whl")
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", str(wheel)],
        check=True,
        timeout=120,
    )
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import relay.app, aiohttp, msal, aiosmtpd"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        **as_user(uid),  # type: ignore[arg-type]
    )
    if probe.returncode != 0:
        pytest.skip(
            f"the test environment's packages are not readable by uid {uid}: {probe.stderr}"
        )
    return venv / "bin"


def in_root(root: Path, args: list[str]) -> list[str]:
    """The image's absolute paths under `root`."""
    return [str(root / a.lstrip("/")) if a.startswith(("/etc/", "/var/")) else a for a in args]


def relay_yaml(root: Path, smtp: int, admin: int) -> str:
    return yaml.safe_dump(
        {
            "listen": [{"address": f"127.0.0.1:{smtp}"}],
            "spool": {"path": str(root / "var/lib/relay/spool")},
            "accounts": {
                "contoso": {
                    "tenant_id": "6f3b9c2e-41d7-4a58-9c0e-2d7f5b1a8e34",
                    "client_id": "0e8f4a6d-93b2-4c71-a5d8-7b1e2f9c3a60",
                    "client_secret": "${AZURE_CLIENT_SECRET}",
                }
            },
            "routes": [{"name": "default", "account": "contoso", "mailbox": "relay@contoso.com"}],
            "admin": {"address": f"127.0.0.1:{admin}"},
            "log": {"format": "json"},
        }
    )


def test_the_image_layout_serves_as_a_non_root_user(image: Image, root: Path) -> None:
    uid = NOBODY if os.geteuid() == 0 else os.getuid()
    bin_dir = build(root, uid)
    # The layout: config and spool volumes, the working directory, owned as in the image.
    config_dir = root / "etc/relay"
    config_dir.mkdir(parents=True)
    for volume in image.volumes:
        (root / volume.lstrip("/")).mkdir(parents=True, exist_ok=True)
    spool = root / "var/lib/relay/spool"
    if os.geteuid() == 0:
        os.chown(spool, uid, uid)
        os.chown(spool.parent, uid, uid)
    smtp, admin = free_port(), free_port()
    (config_dir / "relay.yaml").write_text(relay_yaml(root, smtp, admin))
    env = {
        **image.env,
        "RELAY_HEALTH_URL": image.env["RELAY_HEALTH_URL"].replace(":9025/", f":{admin}/"),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "AZURE_CLIENT_SECRET": "not-a-real-secret",  # as `docker run -e` would give it
    }
    health = [str(bin_dir / image.healthcheck[0]), *image.healthcheck[1:]]
    command = [str(bin_dir / image.entrypoint[0]), *in_root(root, image.entrypoint[1:] + image.cmd)]
    run = {"env": env, "cwd": root / image.workdir.lstrip("/"), **as_user(uid)}

    def healthy() -> bool:
        return subprocess.run(health, capture_output=True, timeout=10, **run).returncode == 0  # type: ignore[call-overload]

    assert not healthy()  # nothing answers yet: the check fails
    log = root / "relay.log"
    with log.open("wb") as err:
        server = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT, **run)  # type: ignore[call-overload]
        try:
            deadline = time.monotonic() + START_LIMIT
            while not healthy():
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
            assert (spool / "lock").stat().st_uid == uid
            assert (spool / "queue").stat().st_uid == uid
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0, log.read_text()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[-1]["message"] == "stopped"
    assert "not-a-real-secret" not in log.read_text()
    assert not healthy()


DOCS = CHECKOUT / "docs"
EXAMPLE_ENV = {
    "AZURE_TENANT_ID": "6f3b9c2e-41d7-4a58-9c0e-2d7f5b1a8e34",
    "AZURE_CLIENT_ID": "0e8f4a6d-93b2-4c71-a5d8-7b1e2f9c3a60",
}


def test_the_compose_example_holds_a_valid_relay_yaml(tmp_path: Path) -> None:
    compose = yaml.safe_load((DOCS / "docker-compose.yml").read_text())
    text = compose["configs"]["relay_yaml"]["content"].replace("$$", "$")  # Compose's escape
    secret = tmp_path / "azure_client_secret"  # what Compose mounts at /run/secrets/
    secret.write_text("the secret value")
    text = text.replace("/run/secrets/azure_client_secret", str(secret))
    config = loads(text, source=str(tmp_path / "relay.yaml"), environ=EXAMPLE_ENV)
    assert config.admin is not None and config.admin.port == 9025
    assert str(config.spool.path) == compose["services"]["relay"]["volumes"][0].split(":")[1]


def test_the_kubernetes_example_holds_a_valid_relay_yaml(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((DOCS / "kubernetes-sidecar.yaml").read_text()))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    token = tmp_path / "azure-identity-token"  # what the workload identity webhook projects
    token.write_text("a.projected.token")
    environ = {**EXAMPLE_ENV, "AZURE_FEDERATED_TOKEN_FILE": str(token)}
    config = loads(
        config_map["data"]["relay.yaml"], source=str(tmp_path / "relay.yaml"), environ=environ
    )
    assert config.accounts["contoso"].credential.kind is CredentialKind.FEDERATED
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (relay,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert relay["restartPolicy"] == "Always"
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(
        parse_image(DOCKERFILE.read_text()).user.split(":")[0]
    )
