"""Release flow, version 3: the old `deploy.finish` is dropped too early."""

from __future__ import annotations

from tests.reliability.deploy_v2 import Approve, Complete, Prepare, Publish, Release

__all__ = ["Approve", "Complete", "Prepare", "Publish", "Release"]
