"""A volume's changes: its overlay upper directory, read against its base.

One concern per module: `overlay_marks.py` (what overlayfs leaves in an upper: whiteouts,
opaque marks, xattrs), `diff_walk.py` (the changes as `docker diff` lists them), `size.py`
(their disk usage), `oci_layer.py` (the changes as an OCI image layer) with
`layer_tar.py` (its tar stream), `merge.py` (the changes copied out with the base, or
into it, or as they are; reset) and `extents.py` (holes). This module only re-exports
what the rest of docker_on_top uses; names with a leading underscore are shared by the
package's modules (tests set some of them in the module that owns them).

The upper root is made by the plugin, not copied up from the base, so its own metadata is
never reported or applied as a change; the kernel ignores an opaque mark on it, and so does
this package (its "x" mark counts). Reading `trusted.*` xattrs needs root.

Everything in the upper was written by a container, which may still be writing while
`diff`, `export_layer` and `changes_size` run: every walk goes through `walk` (directory
descriptors, O_NOFOLLOW, one descriptor per tree, nothing per entry kept), and a file is
read only once fstat has shown it to be regular. Setuid bits and file capabilities are
kept by exports and copies, as an image layer must keep them.
"""

from __future__ import annotations

from .diff_walk import Change, diff
from .merge import apply_to_base, copy_upper, merge_into, reset
from .oci_layer import Report, export_layer, export_squashed, report_nothing
from .size import ChangesSize, changes_size

__all__ = [
    "Change",
    "ChangesSize",
    "Report",
    "apply_to_base",
    "changes_size",
    "copy_upper",
    "diff",
    "export_layer",
    "export_squashed",
    "merge_into",
    "report_nothing",
    "reset",
]
