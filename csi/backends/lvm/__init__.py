"""The lvm backend: volumes as logical volumes of a node's volume group (linear, striped,
mirrored, or thin in a thin pool) and snapshots as LVM snapshots. Every LVM command runs
through ``lvm.Lvm``, and ``failures`` says what LVM's failures mean."""

from __future__ import annotations
