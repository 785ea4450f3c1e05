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
