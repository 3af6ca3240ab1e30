"""PeerRegistry's Registry shape: lookup, subjects, hosting; Peer.subject."""

from __future__ import annotations

import astral
import astral.testing

from .helpers import running_principal, token


async def test_lookup_and_subjects_on_a_peer_registry() -> None:
    async with (
        running_principal() as principal,
        astral.connect(principal.url, token=token("w2")),
        astral.connect(principal.url, token=token("w1")),
    ):
        registry: astral.Registry = principal.registry
        worker = await registry.wait_for("w1")
        assert worker.subject == "w1"
        assert await registry.lookup("w1") is worker
        assert await registry.lookup("nobody") is None
        await registry.wait_for("w2")
        assert await registry.subjects() == ["w1", "w2"]


async def test_hosting_lists_a_peer_for_the_block_only() -> None:
    registry = astral.PeerRegistry()
    async with astral.testing.connected_pair() as (left, _right):
        async with registry.hosting("x", left):
            assert await registry.lookup("x") is left
            assert await registry.subjects() == ["x"]
        assert await registry.lookup("x") is None
        assert await registry.subjects() == []


async def test_a_peer_subject_is_its_sub_claim_when_a_string() -> None:
    async with astral.testing.connected_pair() as (left, _right):
        assert left.subject is None
    async with running_principal() as principal, astral.connect(principal.url, token=token("s")):
        assert (await principal.registry.wait_for("s")).subject == "s"


async def test_a_closed_peer_still_listed_is_neither_looked_up_nor_a_subject() -> None:
    """Between its close and the end of its hosting block, a peer is gone for callers."""
    registry = astral.PeerRegistry()
    async with astral.testing.connected_pair() as (left, _right):
        async with registry.hosting("x", left):
            await left.aclose()
            assert left.closed
            assert await registry.lookup("x") is None
            assert await registry.subjects() == []
