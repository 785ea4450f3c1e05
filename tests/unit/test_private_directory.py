"""The enrollment socket's private directory: one per controller process, and those of
controllers that were killed (kill -9 leaves no chance to remove them) go at the next start."""
import os
import stat
import subprocess
import sys
import tempfile

from controller.rpc.server import private_directory


def test_a_killed_controllers_directory_is_removed_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = tmp_path / f"flux-enroll-{gone.stdout.strip()}-abc123"
    (dead / "enroll.sock").parent.mkdir()
    (dead / "enroll.sock").write_text("")
    running = tmp_path / f"flux-enroll-{os.getpid()}-def456"
    running.mkdir()
    unnamed = tmp_path / "flux-enroll-xyz789"   # no pid in its name: not ours to judge
    unnamed.mkdir()
    other = tmp_path / "something-else-1-a"
    other.mkdir()
    # A link named like a killed controller's directory is neither followed nor removed.
    linked = tmp_path / f"flux-enroll-{gone.stdout.strip()}-link"
    linked.symlink_to(other)

    made = private_directory()

    assert not dead.exists()
    assert running.is_dir() and unnamed.is_dir() and other.is_dir() and linked.is_symlink()
    assert os.path.basename(made).startswith(f"flux-enroll-{os.getpid()}-")
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    assert os.path.dirname(made) == str(tmp_path)
