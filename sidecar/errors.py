"""The sidecar's exception root; the tree is drawn in the package docstring."""

from __future__ import annotations


class SidecarError(Exception):
    """Root of every error the sidecar raises."""
