"""The fault matrix's cases: every fault at every phase it can go in at, and clear refusals."""
import pytest

from tests.faults import FAULTS, PHASES, cases


def test_every_fault_goes_in_at_its_phases_and_the_disk_fault_during_the_copy_only():
    everything = cases()
    assert len(everything) == len(set(everything)) == sum(len(f.phases) for f in FAULTS.values())
    assert ("kill-controller", "provision") in everything and ("partition-db-docker-long", "confirm") in everything
    assert [c for c in everything if c[0] == "disk-full-db"] == [("disk-full-db", "sync")]
    assert cases(["disk-full-db"]) == [("disk-full-db", "sync")]
    assert cases(["kill-caddy"]) == [("kill-caddy", p) for p in PHASES]


@pytest.mark.parametrize("name, says", [
    ("disk-full-db@confirm", "disk-full-db goes in at sync only"),
    ("kill-everything", "FAULT[@PHASE] with FAULT one of"),
    ("kill-caddy@later", "PHASE one of provision, sync, confirm"),
])
def test_an_unknown_case_is_refused_by_name(name, says):
    with pytest.raises(ValueError, match=f"unknown case '{name}'") as caught:
        cases([name])
    assert says in str(caught.value)
