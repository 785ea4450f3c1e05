"""The systemd units verify and carry the hardening the services rely on."""

import configparser
import pathlib
import shutil
import subprocess
import sys

import pytest

UNITS = pathlib.Path(__file__).resolve().parents[2] / "packaging" / "systemd"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("service, state_dir", [("controller", "flux-controller"), ("agent", "flux-agent")])
def test_unit_is_hardened_notify_service(service, state_dir):
    unit = _unit(f"flux-{service}.service")["Service"]
    assert unit["Type"] == "notify"
    assert unit["Restart"] == "on-failure"
    assert unit["User"] and unit["User"] != "root"
    for key, value in HARDENING.items():
        assert unit[key] == value, key
    assert unit["StateDirectory"] == state_dir
    assert unit["ReadWritePaths"] == f"/var/lib/{state_dir}"
    assert f"--state-dir /var/lib/{state_dir}" in unit["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    # The units name the packaged binaries in /usr/bin; point them at this installation's
    # scripts so that verify checks everything else about them as they are.
    bindir = pathlib.Path(sys.executable).parent
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        for tool in ("flux-controller", "flux-agent"):
            text = text.replace(f"/usr/bin/{tool}", str(bindir / tool))
        (tmp_path / unit.name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("dropin, key, value", [
    ("docker.conf", "SupplementaryGroups", "docker"),
    ("gateway.conf", "AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
])
def test_role_drop_ins_add_only_what_their_role_needs(dropin, key, value):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNITS / "flux-agent.service.d" / dropin)
    assert parser["Service"][key] == value
    assert "SupplementaryGroups" not in _unit("flux-agent.service")["Service"]


def _need(*tools: str) -> None:
    """.ci/run installs these; a machine without them fails the test rather than skipping it."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    assert not missing, f"this check needs {', '.join(missing)} (bash packaging/dev-setup.sh installs them)"


@pytest.mark.timeout(1500)
def test_the_packages_install_run_under_systemd_and_upgrade():
    """packaging/check-install.sh: the packages on a server with systemd as PID 1, installed as the
    README's production steps say, then upgraded (see packaging/check_install.py for each check)."""
    import json

    _need("docker", "dpkg-deb", "debootstrap")
    root = UNITS.parents[1]
    proc = subprocess.run(["bash", str(root / "packaging" / "check-install.sh")], capture_output=True, text=True,
                          timeout=1400)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and figures["passed"], figures.get("error") or proc.stderr[-3000:]
    assert figures["flux-controller"]["type"] == figures["flux-agent"]["type"] == "notify"
    assert figures["kill_agent"]["restarts"] == 1 and figures["kill_agent"]["reconnected_s"] < 60
    assert max(figures["stop_s"].values()) <= 10
    assert set(figures["hardening"]["refused"]) >= {"/etc", "/usr", "/var/lib"}
    assert figures["upgrade"]["agent_reports"] == figures["to"] != figures["from"]
    print(json.dumps(figures))


def _shipped_files(deb: pathlib.Path, tmp_path: pathlib.Path) -> dict[str, bytes]:
    import zipfile

    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    [wheel] = tmp_path.glob("usr/share/*/wheels/flux_fleet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# The cache packaging/check_install.py fills: what it holds is not fetched again.
WHEELS = UNITS.parents[1] / "dist" / "wheels"


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict:
    _need("dpkg-deb")
    return _build(UNITS.parents[1], "0.1.0", tmp_path_factory.mktemp("dist"), WHEELS)


def test_the_shipped_cli_has_no_dev_fleet_and_runs_no_apt(packages, tmp_path):
    """The packages' wheel leaves the development tools out: nothing shipped installs packages."""
    assert set(packages) == {"flux-controller", "flux-agent", "flux-cli"}
    files = _shipped_files(pathlib.Path(packages["flux-cli"]), tmp_path / "cli")
    assert any(name.startswith("cli/main.py") for name in files)
    assert not [name for name in files if name.startswith("devtools/")]
    assert not [name for name, data in files.items() if name.endswith(".py") and b"apt-get" in data]


def _build(root: pathlib.Path, version: str, out: pathlib.Path, wheels: pathlib.Path, env: dict | None = None) -> dict:
    import json

    proc = subprocess.run([sys.executable, str(root / "packaging" / "deb" / "build.py"), "--version", version,
                           "--out", str(out), "--wheels", str(wheels)], capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["packages"]


def _dependency_wheels(deb: str) -> set[str]:
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    return {line.rsplit("/", 1)[1] for line in listing.splitlines()
            if line.endswith(".whl") and "/flux_fleet-" not in line}


def test_packages_build_from_a_filled_wheel_cache_without_any_index(packages, tmp_path):
    """--wheels: once a build filled the cache, the next needs neither PyPI nor any other index,
    and ships the same wheels, and only those it needs of what the cache holds."""
    import os

    cache = tmp_path / "wheels"
    shutil.copytree(WHEELS, cache)
    (cache / "unneeded-1.0-py3-none-any.whl").write_bytes(b"not a wheel any package asks for")
    # What builds stopped while filling the cache left: an ended process's copy goes, a running one's stays.
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = cache / f".grpcio-1.0-py3-none-any.whl.{ended.pid}.partial"
    copying = cache / f".grpcio-1.0-py3-none-any.whl.{os.getpid()}.partial"
    for partial in (stale, copying):
        partial.write_bytes(b"half a wheel")
    # pip with no index and no configuration: only the cache can hold what the build needs.
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    offline.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    second = _build(UNITS.parents[1], "0.1.1", tmp_path / "second", cache, env=offline)
    shipped = _dependency_wheels(second["flux-agent"])
    assert shipped == _dependency_wheels(packages["flux-agent"])
    assert shipped and "unneeded-1.0-py3-none-any.whl" not in shipped
    # The cache holds dependencies only: Flux's own wheel is built by every build.
    assert not list(cache.glob("flux_fleet-*")) and list(cache.glob(".*.partial")) == [copying]
