"""Which backups retention removes: the newest of each kept day and week stay, and always the
newest backup and the newest restore-verified one."""

import datetime

from controller.backups import to_remove

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.timezone.utc)


def _backup(n: int, hours_ago: float, status: str = "complete", verified: bool = True) -> dict:
    return {"id": f"b{n}", "status": status, "created_at": NOW - datetime.timedelta(hours=hours_ago),
            "restore_status": "restore_verified" if verified else None}


def test_keeps_the_newest_of_each_day_and_week():
    # Two a day for 21 days, newest first.
    rows = [_backup(n, n * 12) for n in range(42)]
    removed = {r["id"] for r in to_remove(rows, keep_daily=3, keep_weekly=2)}
    kept = [r["id"] for r in rows if r["id"] not in removed]
    # Friday 27th noon back: the 27th, 26th and 25th (their noon backups), and the newest of the
    # week before (Sunday 22nd noon, five days back: b10); this week's newest is b0 already.
    assert kept == ["b0", "b2", "b4", "b10"]
    assert len(removed) == 38


def test_never_removes_the_newest_nor_the_newest_verified_nor_one_being_made():
    rows = [_backup(0, 1, verified=False), _backup(1, 2), _backup(2, 3, status="failed"),
            _backup(3, 4, status="running")]
    # The failed one goes: older than a complete one, and it may have left a file.
    assert {r["id"] for r in to_remove(rows, keep_daily=0, keep_weekly=1)} == {"b2"}
    rows.append(_backup(4, 30))
    assert {r["id"] for r in to_remove(rows, keep_daily=1, keep_weekly=0)} == {"b2", "b4"}


def test_a_period_keeps_its_verified_backup_over_a_newer_unverified_one():
    rows = [_backup(0, 1), _backup(1, 25, verified=False), _backup(2, 26), _backup(3, 27, verified=False)]
    # Yesterday's slot goes to b2 (verified), not b1 (newer, not verified).
    assert {r["id"] for r in to_remove(rows, keep_daily=2, keep_weekly=0)} == {"b1", "b3"}
