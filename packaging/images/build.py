"""Builds the local images for hosts without an image registry, from Debian packages.

    python packaging/images/build.py [--json] [IMAGE ...]

Each image is a Debian root file system made with debootstrap and loaded with
`docker import`: a Postgres 15 server, and the PostgREST stand-in (NOT PostgREST;
see postgrest-standin/); and, when asked for, `host`: a Debian server with systemd as PID 1,
which packaging/check-install.sh installs the packages on. Tags carry a hash of their build inputs, so a second build
reuses what exists and a changed input builds anew. Prints the image names.
"""

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
SUITE = "bookworm"


class Image:
    def __init__(self, repository: str, packages: list[str], files: dict[str, pathlib.Path], changes: list[str],
                 remove: list[str]):
        self.repository = repository
        self.packages = packages
        self.files = files
        self.changes = changes
        self.remove = remove

    @property
    def tag(self) -> str:
        digest = hashlib.sha256()
        for part in (SUITE, *self.packages, *self.changes, *self.remove):
            digest.update(part.encode() + b"\0")
        for target, source in sorted(self.files.items()):
            digest.update(target.encode() + b"\0" + source.read_bytes())
        return f"{self.repository}:{digest.hexdigest()[:12]}"

    def exists(self) -> bool:
        return subprocess.run(["docker", "image", "inspect", self.tag], capture_output=True).returncode == 0

    def build(self) -> None:
        root = pathlib.Path(tempfile.mkdtemp(prefix="flux-image-"))
        try:
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(self.packages)}",
                            SUITE, str(root)], check=True, stdout=subprocess.DEVNULL)
            for target, source in self.files.items():
                dest = root / target.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)
            for path in self.remove:
                shutil.rmtree(root / path.lstrip("/"), ignore_errors=True)
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (root / cache).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            command = ["docker", "import"]
            for change in self.changes:
                command += ["--change", change]
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run([*command, "-", self.tag], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
            if tar.wait() != 0:
                raise SystemExit("tar of the image root failed")
        finally:
            shutil.rmtree(root, ignore_errors=True)


IMAGES = {
    "postgres": Image(
        "flux-local/postgres",
        ["postgresql-15"],
        {"/usr/local/bin/docker-entrypoint.sh": HERE / "postgres" / "docker-entrypoint.sh"},
        ["ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "ENV PGDATA=/var/lib/postgresql/data",
         "ENV LANG=C.UTF-8",
         "EXPOSE 5432",
         'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]',
         'CMD ["postgres"]'],
        ["/var/lib/postgresql/15/main", "/etc/postgresql/15/main"],
    ),
    "postgrest": Image(
        "flux-local/postgrest-standin",
        ["python3", "python3-psycopg"],
        {"/app/postgrest_standin.py": HERE / "postgrest-standin" / "postgrest_standin.py"},
        ["ENV PGRST_SERVER_HOST=0.0.0.0",
         "ENV PGRST_SERVER_PORT=3000",
         "ENV PYTHONUNBUFFERED=1",
         "EXPOSE 3000",
         'CMD ["python3", "/app/postgrest_standin.py"]'],
        [],
    ),
    # A server to install the packages on (packaging/check-install.sh): systemd as PID 1, the
    # Python the packages' environments are made with, and a PostgreSQL for the catalog.
    "host": Image(
        "flux-local/systemd-host",
        ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "postgresql-15", "adduser",
         "procps", "iproute2", "ca-certificates", "curl"],
        {},
        ["ENV container=docker", "ENV LANG=C.UTF-8", 'CMD ["/sbin/init"]'],
        [],
    ),
}
# What the local fleet and the tests run; `host` is built when asked for by name.
FLEET_IMAGES = ("postgres", "postgrest")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the image names as one JSON object")
    parser.add_argument("--names-only", action="store_true", help="print the names without building")
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help=f"which images ({', '.join(IMAGES)}; default: {', '.join(FLEET_IMAGES)})")
    args = parser.parse_args()
    unknown = [name for name in args.images if name not in IMAGES]
    if unknown:
        parser.error(f"no image {', '.join(unknown)}; the images are {', '.join(IMAGES)}")
    names = {}
    for key in args.images or FLEET_IMAGES:
        image = IMAGES[key]
        names[key] = image.tag
        if args.names_only:
            continue
        if image.exists():
            print(f"image {image.tag} exists; reusing it", file=sys.stderr)
            continue
        print(f"building {image.tag} from Debian packages ({', '.join(image.packages)})", file=sys.stderr, flush=True)
        image.build()
    print(json.dumps(names) if args.json else "\n".join(f"{k}: {v}" for k, v in names.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
