"""Choices a migration's plan makes from its options and its preflight, without running it."""

from controller.migrate import plan
from controller.migrate.plan import Options


def test_a_new_stack_is_filled_in_bulk_load_mode_online_at_any_size():
    assert plan.bulk_load(Options(online=True), 0)
    assert plan.bulk_load(Options(online=True, staged=True), 10 * 1024)


def test_offline_only_a_large_tenant_pays_for_the_restart_inside_the_pause():
    assert not plan.bulk_load(Options(online=False), plan.BULK_LOAD_OFFLINE_BYTES - 1)
    assert plan.bulk_load(Options(online=False), plan.BULK_LOAD_OFFLINE_BYTES)
    # Older migrations recorded no choice: they moved under the lock.
    assert not plan.bulk_load(Options(online=None), 1024)


def test_the_online_plan_restarts_the_stack_before_the_sync_is_checked():
    names = plan.build(Options(online=True)).names
    assert names.index("sync") < names.index("bootstrap") < names.index("catch_up") < names.index("lock")
