"""Where a command goes: the one home for reading a Ray address and telling its kind.
Pure (no Ray): lint, the CLI and the control side all use it."""
from __future__ import annotations

import os


def explicit_address(address: str | None, spec_address: str | None = None) -> str | None:
    """The address a user named: the --address flag, then RAY_ADDRESS, then the spec's ray.address."""
    return address or os.environ.get("RAY_ADDRESS") or spec_address


def address_kind(address: str | None) -> str:
    """"client" (ray://, Ray Client), "jobs" (http[s]://HEAD:8265, the job API) or "gcs"."""
    if address and address.startswith("ray://"):
        return "client"
    if address and address.startswith(("http://", "https://")):
        return "jobs"
    return "gcs"


def remote_address(address: str | None) -> bool:
    """Ray Client and Ray Jobs reach a cluster that is not this machine."""
    return address_kind(address) != "gcs"
