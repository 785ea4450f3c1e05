"""Builds the Debian packages flux-controller, flux-agent and flux-cli into dist/.

    python packaging/deb/build.py [--version 0.1.0] [--out dist] [--wheels DIR]

Each package carries the wheels of Flux and of everything it imports (built or fetched once
with pip, for the Python 3.11 of Debian bookworm), and makes its Python environment from them
at install, with no network: /opt/flux-controller, /opt/flux-agent, /opt/flux-cli, and
/usr/bin/flux-controller, /usr/bin/flux-agent, /usr/bin/flux link into them. The local dev fleet
and the test harness are not in them (the wheel holds no `devtools` package).

flux-controller and flux-agent also install:
  - a system user (flux for the controller, flux-agent for the agent) and its state directory,
    /var/lib/flux-controller or /var/lib/flux-agent, owned by it, mode 0700, kept on removal;
  - the systemd unit, enabled at install; an upgrade restarts a running service, a removal stops
    and disables it. The agent's role drop-ins (docker.conf, gateway.conf) are in
    /usr/share/flux-agent/systemd/, to be linked into /etc/systemd/system/flux-agent.service.d/.

Prints the packages' paths; the last line is one JSON object naming them.
"""

import argparse
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
PYTHON_TAG = "cp311"


class Package:
    def __init__(self, name: str, description: str, commands: dict[str, str], user: str | None = None,
                 state_dir: str | None = None, unit: str | None = None, drop_ins: list[str] = (),
                 on_upgrade: str = ""):
        self.name = name
        self.description = description
        # /usr/bin/<link> -> the environment's bin/<script>
        self.commands = commands
        self.user = user
        self.state_dir = state_dir
        self.unit = unit
        self.drop_ins = list(drop_ins)
        # Shell run on an upgrade, before the service restarts.
        self.on_upgrade = on_upgrade

    @property
    def prefix(self) -> str:
        return f"/opt/{self.name}"

    @property
    def wheels(self) -> str:
        return f"/usr/share/{self.name}/wheels"


PACKAGES = [
    Package("flux-controller", "Flux fleet controller: the catalog, the HTTP API and the agents' gRPC service",
            {"flux-controller": "flux-controller"}, user="flux", state_dir="/var/lib/flux-controller",
            unit="flux-controller.service",
            # The catalog's schema follows the code: `init` applies what is new and changes nothing else.
            on_upgrade="""if [ -f /var/lib/flux-controller/controller.json ]; then
    runuser -u flux -- /usr/bin/flux-controller init --state-dir /var/lib/flux-controller >/dev/null \\
        || echo "flux-controller: the catalog schema was not upgraded; run" \\
            "runuser -u flux -- flux-controller init --state-dir /var/lib/flux-controller" >&2
fi"""),
    Package("flux-agent", "Flux fleet agent: runs the controller's jobs on a database, Docker, gateway or "
            "backup host", {"flux-agent": "flux-agent"}, user="flux-agent", state_dir="/var/lib/flux-agent",
            unit="flux-agent.service", drop_ins=["docker.conf", "gateway.conf"]),
    Package("flux-cli", "Flux fleet command line (flux)", {"flux": "flux"}),
]


def _script(text: str) -> str:
    return "#!/bin/sh\nset -e\n" + text.strip() + "\n\nexit 0\n"


def postinst(package: Package, version: str) -> str:
    text = f"""
if [ "$1" = configure ]; then
    # The Python environment, made from the packaged wheels (no network), then swapped in.
    rm -rf {package.prefix}.new
    python3 -m venv {package.prefix}.new
    {package.prefix}.new/bin/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check \\
        --find-links {package.wheels} "flux-fleet=={version}"
    # Its scripts name the interpreter by the path they were made at: they move with it. Only
    # regular files: bin/python* are links to the system's interpreter, which must stay links.
    for script in {package.prefix}.new/bin/*; do
        if [ -f "$script" ] && [ ! -L "$script" ]; then
            sed -i "1s|^#!{package.prefix}.new/|#!{package.prefix}/|" "$script"
        fi
    done
    sed -i "s|{package.prefix}.new|{package.prefix}|g" {package.prefix}.new/bin/activate* {package.prefix}.new/pyvenv.cfg
    rm -rf {package.prefix}.old
    if [ -d {package.prefix} ]; then mv {package.prefix} {package.prefix}.old; fi
    mv {package.prefix}.new {package.prefix}
    rm -rf {package.prefix}.old
"""
    for link, script in package.commands.items():
        text += f"    ln -sf {package.prefix}/bin/{script} /usr/bin/{link}\n"
    if package.user:
        text += f"""
    if ! getent passwd {package.user} >/dev/null; then
        adduser --system --group --home {package.state_dir} --no-create-home \\
            --gecos "{package.description.split(':')[0]}" {package.user}
    fi
    install -d -o {package.user} -g {package.user} -m 0700 {package.state_dir}
"""
    if package.unit:
        text += f"""
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable {package.unit} >/dev/null 2>&1 || true
        # An upgrade restarts a service that runs; a first install waits for `init` or `enroll`.
        if [ -n "$2" ]; then
{textwrap.indent(package.on_upgrade or ":", " " * 12)}
            systemctl try-restart {package.unit}
        fi
    fi
"""
    text += "fi\n"
    return _script(text)


def prerm(package: Package) -> str:
    text = ""
    if package.unit:
        text += f"""
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop {package.unit} || true
    systemctl disable {package.unit} >/dev/null 2>&1 || true
fi
"""
    text += f"""
if [ "$1" = remove ]; then
"""
    for link in package.commands:
        text += f"    rm -f /usr/bin/{link}\n"
    text += f"    rm -rf {package.prefix} {package.prefix}.new {package.prefix}.old\nfi\n"
    return _script(text)


def postrm(package: Package) -> str:
    text = ""
    if package.unit:
        text += """
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
"""
    if package.user:
        text += f"""
# The state directory (keys, certificates, the catalog's settings, spooled results) is kept on
# removal; only a purge removes it.
if [ "$1" = purge ]; then
    rm -rf {package.state_dir}
fi
"""
    return _script(text or ":")


PLATFORM = ["--only-binary", ":all:", "--python-version", "3.11", "--implementation", "cp", "--abi", PYTHON_TAG,
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "any"]


def _setuptools_here() -> bool:
    """Whether this interpreter has a setuptools that builds Flux's wheel on its own (70.1 or later,
    which needs no `wheel` package): it is then built with it, instead of in a new environment
    that pip fills from the index first."""
    try:
        found = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = re.match(r"(\d+)\.(\d+)", found)
    return parts is not None and (int(parts[1]), int(parts[2])) >= (70, 1)


def _fetched_from_cache(download: list[str], cache: pathlib.Path, out: pathlib.Path, ours: pathlib.Path) -> bool:
    """Runs `download` with the wheels in `cache` alone (the index is not asked; only the wheels
    needed are copied). False when the cache lacks one: the reason is told, and what the attempt
    left in `out` removed, so that no wheel fetched again is carried twice."""
    if not any(cache.glob("*.whl")):
        return False
    offline = subprocess.run([*download, "--no-index", "--find-links", str(cache)], capture_output=True, text=True)
    if offline.returncode == 0:
        return True
    why = (offline.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
    print(f"the wheel cache {cache} does not hold every wheel needed ({why}); asking the index",
          file=sys.stderr, flush=True)
    for wheel in out.glob("*.whl"):
        if wheel != ours:
            wheel.unlink()
    return False


def _drop_stale_partials(cache: pathlib.Path) -> None:
    """Removes the wheels a build stopped while adding them to `cache` left half-copied (their
    names end in the copying process's id); a running build's are left alone."""
    for partial in cache.glob(".*.partial"):
        pid = partial.suffixes[-2].lstrip(".") if len(partial.suffixes) >= 2 else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, OverflowError):  # no process has (or can have) that id
            partial.unlink(missing_ok=True)
        except PermissionError:  # another user's, alive
            pass


def build_wheels(source: pathlib.Path, version: str, out: pathlib.Path, cache: pathlib.Path | None = None) -> None:
    """Flux's wheel at `version`, and every wheel it needs, into `out`. With a `cache`, the wheels
    in it are used when they satisfy every requirement (the index is not asked), and what was
    fetched is added to it."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="flux-wheel-"))
    try:
        tree = work / "src"
        shutil.copytree(source, tree, ignore=shutil.ignore_patterns(
            ".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", "tests", "bench", "node_modules"))
        pyproject = tree / "pyproject.toml"
        text, count = re.subn(r'(?m)^version = "[^"]*"$', f'version = "{version}"', pyproject.read_text())
        if count != 1:
            raise SystemExit("pyproject.toml has no single `version = ...` line")
        # The development tools stay out: they install packages and start engines on the machine.
        text, count = re.subn(r', "devtools\*"', "", text)
        if count != 1:
            raise SystemExit('pyproject.toml\'s packages do not list "devtools*" once')
        shutil.rmtree(tree / "devtools")
        pyproject.write_text(text)
        # Flux's own wheel, then the others for bookworm's Python 3.11 (binary wheels only).
        isolation = ["--no-build-isolation"] if _setuptools_here() else []
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation,
                        "--wheel-dir", str(out), str(tree)], check=True)
        ours = next(out.glob(f"flux_fleet-{version}-*.whl"))
        download = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(out), *PLATFORM, str(ours)]
        if cache is not None and cache.is_dir():
            _drop_stale_partials(cache)
        if cache is None or not _fetched_from_cache(download, cache, out, ours):
            subprocess.run(download, check=True)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            for wheel in out.glob("*.whl"):
                if wheel != ours and not (cache / wheel.name).exists():
                    # Under a name of its own until whole: a build stopped halfway leaves no broken wheel.
                    partial = cache / f".{wheel.name}.{os.getpid()}.partial"
                    shutil.copy2(wheel, partial)
                    os.replace(partial, cache / wheel.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_package(package: Package, version: str, wheels: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    root = pathlib.Path(tempfile.mkdtemp(prefix=f"{package.name}-"))
    try:
        share = root / package.wheels.lstrip("/")
        share.mkdir(parents=True)
        for wheel in sorted(wheels.glob("*.whl")):
            shutil.copy2(wheel, share / wheel.name)
        if package.unit:
            units = root / "lib" / "systemd" / "system"
            units.mkdir(parents=True)
            shutil.copy2(UNITS / package.unit, units / package.unit)
        if package.drop_ins:
            drop_ins = root / "usr" / "share" / package.name / "systemd"
            drop_ins.mkdir(parents=True)
            for name in package.drop_ins:
                shutil.copy2(UNITS / f"{package.unit}.d" / name, drop_ins / name)
        debian = root / "DEBIAN"
        debian.mkdir()
        size_kb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024
        (debian / "control").write_text(
            f"Package: {package.name}\nVersion: {version}\nArchitecture: amd64\n"
            f"Maintainer: Flux fleet <flux@localhost>\nInstalled-Size: {size_kb}\n"
            f"Depends: python3 (>= 3.11), python3 (<< 3.12), python3-venv, adduser\n"
            f"Section: admin\nPriority: optional\nDescription: {package.description}\n")
        for name, text in (("postinst", postinst(package, version)), ("prerm", prerm(package)),
                           ("postrm", postrm(package))):
            (debian / name).write_text(text)
            (debian / name).chmod(0o755)
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{package.name}_{version}_amd64.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(target)],
                       check=True, stdout=subprocess.DEVNULL)
        return target
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default=None, help="the packages' version, X.Y.Z (default: pyproject.toml's)")
    parser.add_argument("--out", default=str(ROOT / "dist"), help="where the .deb files go (default dist/)")
    parser.add_argument("--wheels", metavar="DIR",
                        help="a cache of the wheels Flux needs: used when it holds every one (the index is "
                             "not asked), and what was fetched is added to it (default: everything fetched anew)")
    args = parser.parse_args()
    version = args.version or re.search(r'(?m)^version = "([^"]*)"$', (ROOT / "pyproject.toml").read_text())[1]
    if not VERSION.match(version):
        parser.error(f"--version must be X.Y.Z (digits), not {version!r}")
    if shutil.which("dpkg-deb") is None:
        parser.error("dpkg-deb is not installed (Debian's dpkg package)")
    cache = pathlib.Path(args.wheels) if args.wheels else None
    if cache is not None and cache.exists() and not cache.is_dir():
        parser.error(f"--wheels {cache} is not a directory")
    out = pathlib.Path(args.out)
    wheels = pathlib.Path(tempfile.mkdtemp(prefix="flux-wheels-"))
    try:
        print(f"building the wheels of flux-fleet {version}", file=sys.stderr, flush=True)
        build_wheels(ROOT, version, wheels, cache)
        built = {}
        for package in PACKAGES:
            built[package.name] = str(build_package(package, version, wheels, out))
            print(built[package.name], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    print(json.dumps({"version": version, "packages": built}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
