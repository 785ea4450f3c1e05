"""Which project a command means: -p/--hash, else the repo-root flux.json."""

import json
import pathlib
import re

from .errors import CliError

PROJECT_FILE = "flux.json"
_HASH = re.compile(r"^[0-9a-f]{7}$")
MIGRATION_DIRS = ("migrations", "flux/migrations", "sql")
SCHEMA_FILE = "schema.sql"


def find_project_file(start: pathlib.Path | None = None) -> pathlib.Path | None:
    """flux.json in the current directory or the nearest parent up to the repository root."""
    here = (start or pathlib.Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PROJECT_FILE
        if candidate.is_file():
            return candidate
        if (folder / ".git").exists():
            return None
    return None


def resolve(slug: str | None, hash_: str | None) -> tuple[str, str]:
    if not (slug and hash_):
        path = find_project_file()
        if path is not None:
            try:
                data = json.loads(path.read_text())
            except ValueError:
                raise CliError(f"{path} is not valid JSON") from None
            if slug and data.get("slug") and slug != data.get("slug") and not hash_:
                raise CliError(f"-p {slug} does not match {path} (slug {data.get('slug')}); pass --hash too",
                               exit_code=2)
            slug = slug or data.get("slug")
            hash_ = hash_ or data.get("hash")
    if not slug or not hash_:
        raise CliError("which project? pass -p/--project SLUG and --hash HASH (see `flux list`), "
                       "or add a flux.json with slug and hash", exit_code=2)
    if not _HASH.match(hash_):
        raise CliError(f"--hash must be 7 lower-case hex characters, got {hash_!r}", exit_code=2)
    return slug, hash_


def migration_files(path: str | None) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The files a push sends: a file, a directory's *.sql, or the first default location found."""
    if path:
        target = pathlib.Path(path)
        if not target.exists():
            raise CliError(f"{path} does not exist", exit_code=2)
    else:
        candidates = [pathlib.Path(d) for d in MIGRATION_DIRS] + [pathlib.Path(SCHEMA_FILE)]
        target = next((c for c in candidates if c.exists()), None)
        if target is None:
            raise CliError("nothing to push: no migrations/, flux/migrations/, sql/ or schema.sql here",
                           exit_code=2)
    if target.is_file():
        return target, [target]
    files = sorted(p for p in target.iterdir() if p.is_file() and p.suffix == ".sql")
    if not files:
        raise CliError(f"{target} holds no .sql files", exit_code=2)
    return target, files
