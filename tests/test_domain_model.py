"""A stateful model of a merge domain over three member processes: random writes,
scans, domain-wide steps, joins, leaves and SIGKILLs (the killed member restarted).
After every step, every byte of every live member matches what that member wrote
(each member keeps its own model of its pages: no other process may change them).
"""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_domain import Member, step

import ksm

pytestmark = pytest.mark.skipif(not ksm.available(), reason="merging is not available here")

PAGES = 8
SEED = 31
MEMBERS = 3


class DomainMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.name = "model-" + uuid.uuid4().hex[:12]
        self.members: list[Member] = []
        self.joined: list[bool] = []
        for _ in range(MEMBERS):
            self.members.append(Member(SEED, PAGES))
            self.joined.append(False)
            self.join(len(self.members) - 1)

    def join(self, i: int) -> None:
        assert self.members[i]("join " + self.name) == {"ok": True}
        self.joined[i] = True

    @rule(i=st.integers(0, MEMBERS - 1), page=st.integers(0, PAGES - 1), byte=st.sampled_from([0, 7, 7, 200]))
    def write(self, i: int, page: int, byte: int) -> None:
        # Few distinct bytes: pages written alike in several members merge with each other.
        self.members[i](f"write {page} {byte}")

    @rule(i=st.integers(0, MEMBERS - 1))
    def scan(self, i: int) -> None:
        self.members[i]("scan 1")
        self.members[i]("sync")

    @rule()
    def step_all(self) -> None:
        # A domain-wide step over the members in the domain; one that left scans alone.
        step([m for m, joined in zip(self.members, self.joined, strict=True) if joined])
        for m, joined in zip(self.members, self.joined, strict=True):
            if not joined:
                m("scan 1")

    @rule(i=st.integers(0, MEMBERS - 1))
    def leave_or_join(self, i: int) -> None:
        if self.joined[i]:
            self.members[i]("leave")
            self.joined[i] = False
        else:
            self.join(i)

    @rule(i=st.integers(0, MEMBERS - 1))
    def kill_and_restart(self, i: int) -> None:
        self.members[i].kill()
        self.members[i] = Member(SEED, PAGES)
        self.joined[i] = False
        self.join(i)

    @rule(i=st.integers(0, MEMBERS - 1))
    def fork(self, i: int) -> None:
        # The child checks its inherited pages (exit 0) and writes its own copy.
        assert self.members[i]("fork") == {"child": 0}

    @invariant()
    def every_byte_is_what_its_member_wrote(self) -> None:
        for m in self.members:
            assert m("check")["bad"] == []

    def teardown(self) -> None:
        for m in self.members:
            m.close()


TestDomainMachine = DomainMachine.TestCase
# Each example starts three interpreters: a tenth of the profile's examples.
_profile = settings()  # the profile's settings
TestDomainMachine.settings = settings(
    _profile,
    max_examples=max(3, _profile.max_examples // 10),
    stateful_step_count=min(25, _profile.stateful_step_count),
)
if os.environ.get("KSM_HYPOTHESIS_PROFILE", "fast") != "fast":
    TestDomainMachine.pytestmark = [pytest.mark.timeout(3600)]  # type: ignore[attr-defined]  # read by pytest
