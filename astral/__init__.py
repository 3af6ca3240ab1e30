"""astral: secure bidirectional RPC over one WebSocket, for asyncio and trio.

Two peers each expose named capabilities (async callables) and call each
other's. Frames are plain JSON (``call``, ``yield``, ``result``); nothing but a
registered capability ever runs. See ``docs/`` for the guide.

Everything public is re-exported here; the modules behind it are private.
"""

from __future__ import annotations

from ._auth import JWTVerifier as JWTVerifier
from ._auth import Verifier as Verifier
from ._auth import mint_token as mint_token
from ._auth import verify_token as verify_token
from ._client import connect as connect
from ._dispatch import Callable as Callable
from ._dispatch import Capability as Capability
from ._dispatch import handle as handle
from ._exceptions import AstralError as AstralError
from ._exceptions import AuthenticationError as AuthenticationError
from ._exceptions import CallError as CallError
from ._exceptions import CallTimeout as CallTimeout
from ._exceptions import ClusterError as ClusterError
from ._exceptions import ConnectError as ConnectError
from ._exceptions import ConnectionClosed as ConnectionClosed
from ._exceptions import ConnectTimeout as ConnectTimeout
from ._exceptions import Failure as Failure
from ._exceptions import HandshakeError as HandshakeError
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import RemoteError as RemoteError
from ._exceptions import StreamOverrun as StreamOverrun
from ._exceptions import TLSError as TLSError
from ._exceptions import Unauthorized as Unauthorized
from ._exceptions import ValidationError as ValidationError
from ._frames import Call as Call
from ._frames import Cancel as Cancel
from ._frames import Credit as Credit
from ._frames import End as End
from ._frames import Frame as Frame
from ._frames import Item as Item
from ._frames import Result as Result
from ._frames import Want as Want
from ._frames import Yield as Yield
from ._frames import decode as decode
from ._frames import encode as encode
from ._middleware import CallInfo as CallInfo
from ._middleware import Middleware as Middleware
from ._peer import AcceptedPeer as AcceptedPeer
from ._peer import CallContext as CallContext
from ._peer import Peer as Peer
from ._peer import Stream as Stream
from ._peer import accept as accept
from ._peer import current_call as current_call
from ._peer import current_peer as current_peer
from ._principal import PeerRegistry as PeerRegistry
from ._principal import Registry as Registry
from ._principal import Worker as Worker
from ._ref import Ref as Ref
from ._ref import ref as ref
from ._server import serve as serve
from ._transport import Transport as Transport
from ._worker import Backoff as Backoff
from ._worker import run_worker as run_worker

__version__ = "0.1.0"

__all__ = [
    "AcceptedPeer",
    "AstralError",
    "AuthenticationError",
    "Backoff",
    "Call",
    "CallContext",
    "CallError",
    "CallInfo",
    "CallTimeout",
    "Callable",
    "Cancel",
    "Capability",
    "ClusterError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "Credit",
    "End",
    "Failure",
    "Frame",
    "HandshakeError",
    "Item",
    "JWTVerifier",
    "Middleware",
    "Peer",
    "PeerRegistry",
    "ProtocolError",
    "Ref",
    "Registry",
    "RemoteError",
    "Result",
    "Stream",
    "StreamOverrun",
    "TLSError",
    "Transport",
    "Unauthorized",
    "ValidationError",
    "Verifier",
    "Want",
    "Worker",
    "Yield",
    "accept",
    "connect",
    "current_call",
    "current_peer",
    "decode",
    "encode",
    "handle",
    "mint_token",
    "ref",
    "run_worker",
    "serve",
    "verify_token",
]
