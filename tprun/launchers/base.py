"""The one thing every launcher adapter produces: where this process sits in the job."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import ClassVar


class LauncherError(RuntimeError):
    """The launcher's environment is impossible or incomplete; the message says what to set."""


@dataclass(frozen=True)
class DistributedArgs:
    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    # True where the launcher's agent already serves the TCPStore on master_port (torchrun does):
    # rank 0 must then connect to it rather than bind the port again.
    store_hosted_by_launcher: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise LauncherError(f"{self.launcher}: world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise LauncherError(
                f"{self.launcher}: rank {self.rank} is outside the world of {self.world_size} "
                f"(rank must be in [0, {self.world_size - 1}]); check the launcher's rank/size variables"
            )
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise LauncherError(
                f"{self.launcher}: local rank {self.local_rank} is outside the {self.local_world_size} "
                "processes on this node"
            )
        if not 0 < self.master_port < 65536:
            raise LauncherError(f"{self.launcher}: master port {self.master_port} is not a TCP port")

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    def as_dict(self) -> dict:
        return {**asdict(self), "init_method": self.init_method}


class Launcher:
    """A launcher is mostly a table: field name -> the environment variable that holds it.

    Subclasses set `name`, `env` (field -> variable) and `required` (variables whose presence
    identifies this launcher), and override a property only where a field is derived, not read.
    """

    name: ClassVar[str]
    env: ClassVar[dict[str, str]] = {}
    required: ClassVar[tuple[str, ...]] = ()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)

    @classmethod
    def matches(cls, environ: Mapping[str, str]) -> bool:
        return bool(cls.required) and all(environ.get(v) for v in cls.required)

    def _get(self, field: str, default: str | None = None) -> str:
        var = self.env[field]
        value = self.environ.get(var, default)
        if value is None or value == "":
            raise LauncherError(f"{self.name}: environment variable {var} ({field}) is not set")
        return value

    def _int(self, field: str, default: int | None = None) -> int:
        raw = self._get(field, None if default is None else str(default))
        try:
            return int(raw)
        except ValueError:
            raise LauncherError(
                f"{self.name}: {self.env[field]}={raw!r} ({field}) is not an integer"
            ) from None

    @property
    def rank(self) -> int:
        return self._int("rank")

    @property
    def local_rank(self) -> int:
        return self._int("local_rank")

    @property
    def world_size(self) -> int:
        return self._int("world_size")

    @property
    def local_world_size(self) -> int:
        return self._int("local_world_size")

    @property
    def master_addr(self) -> str:
        return self._get("master_addr")

    @property
    def master_port(self) -> int:
        return self._int("master_port")

    def distributed_args(self) -> DistributedArgs:
        return DistributedArgs(
            launcher=self.name,
            rank=self.rank,
            local_rank=self.local_rank,
            world_size=self.world_size,
            local_world_size=self.local_world_size,
            master_addr=self.master_addr,
            master_port=self.master_port,
        )
