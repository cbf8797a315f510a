"""Tasks: one object per kind of problem (placeholder; filled in by the Task seam)."""
