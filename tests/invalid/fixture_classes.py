"""Tiny classes the invalid specs import (from the spec's folder, as the linter does)."""


class Store:
    def __init__(self, size: int, *, name: str = "store"):
        self.size = size
        self.name = name

    async def get(self, key: str):
        return None

    async def put(self, key: str, value) -> bool:
        return True

    counter = 3  # an attribute, not a method


def add_StoreServicer_to_server(servicer, server):
    """Stands in for a generated gRPC registration function."""


class Plain:
    """No constructor arguments; a few methods for routes and gRPC methods."""

    async def get(self, key: str = ""):
        return key

    async def get_other(self, id: str = ""):
        return id

    async def info(self) -> dict:
        return {}
