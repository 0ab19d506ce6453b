"""No launcher: a single process. The port is only used if something asks for a process group."""

from __future__ import annotations

from tprun.launchers.base import Launcher


class LocalLauncher(Launcher):
    name = "local"
    env = {"master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"}

    @classmethod
    def matches(cls, environ) -> bool:
        return True

    rank = 0
    local_rank = 0
    world_size = 1
    local_world_size = 1

    @property
    def master_addr(self) -> str:
        return self._get("master_addr", "127.0.0.1")

    @property
    def master_port(self) -> int:
        port = self.environ.get("MASTER_PORT")
        if port:
            return self._int("master_port")
        return free_port()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
